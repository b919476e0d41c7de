//! Prints the CRDs as YAML, or writes them into each directory given: `<dir>/<name>.yaml` with
//! CEL validation rules and `<dir>/pre-1.25/<name>.yaml` without them (older API servers refuse
//! them in server-side apply). `make crds` runs `crdgen crds charts/conclave/files/crds`.

use std::path::Path;

fn main() -> anyhow::Result<()> {
    let dirs: Vec<String> = std::env::args().skip(1).collect();
    for crd in operator::crds() {
        if dirs.is_empty() {
            print!("---\n{}", operator::crd_yaml(&crd, true)?);
        }
        for dir in &dirs {
            let old = Path::new(dir).join(operator::PRE_CEL_DIR);
            std::fs::create_dir_all(&old)?;
            let file = operator::crd_file_name(&crd);
            std::fs::write(Path::new(dir).join(&file), operator::crd_yaml(&crd, true)?)?;
            std::fs::write(old.join(&file), operator::crd_yaml(&crd, false)?)?;
        }
    }
    Ok(())
}
