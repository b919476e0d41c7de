//! Prints the CRDs as YAML, or writes one file per CRD into the directories given.
//! `make crds` runs `crdgen crds charts/conclave/crds`.

use std::path::Path;

fn main() -> anyhow::Result<()> {
    let dirs: Vec<String> = std::env::args().skip(1).collect();
    for crd in operator::crds() {
        let yaml = operator::crd_yaml(&crd)?;
        if dirs.is_empty() {
            print!("---\n{yaml}");
        }
        for dir in &dirs {
            std::fs::create_dir_all(dir)?;
            std::fs::write(Path::new(dir).join(operator::crd_file_name(&crd)), &yaml)?;
        }
    }
    Ok(())
}
