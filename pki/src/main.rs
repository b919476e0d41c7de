//! `conclave-pki`: development certificates for local runs and e2e scripts.
//! In a cluster the operator issues certificates; this tool is for everything
//! outside one (a KMS in "another data center", a laptop run of the nodes).

use conclave_pki::rustls::pki_types::CertificateDer;
use conclave_pki::{DevPki, Identity, PkiError, ServerNames, Validity, inspect, pem};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

const USAGE: &str = "\
usage:
  conclave-pki init DIR NAMESPACE
      create DIR/ca.crt and DIR/ca.key (kept if they exist)
  conclave-pki server DIR NAME IDENTITY [--dns NAME]... [--ip ADDR]... [--lifetime SECS]
      write DIR/NAME.crt and DIR/NAME.key; without --dns/--ip the certificate
      covers localhost, 127.0.0.1 and ::1
  conclave-pki client DIR NAME IDENTITY [--lifetime SECS]
      write DIR/NAME.crt and DIR/NAME.key
  conclave-pki inspect CERT.pem
      print identity, validity (Unix seconds), renew-after and SANs

IDENTITY is conclave://<namespace>/<kind>/<name>[/<pod>]; kinds: kms, relay,
connector, operator, admin, recording-reader. Default lifetime: 86400 s.";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("conclave-pki: {msg}");
            ExitCode::from(2)
        }
    }
}

struct Options {
    dns: Vec<String>,
    ips: Vec<IpAddr>,
    lifetime: Duration,
}

fn options(rest: &[String]) -> Result<Options, String> {
    let mut opts = Options {
        dns: Vec::new(),
        ips: Vec::new(),
        lifetime: conclave_pki::DEV_LIFETIME,
    };
    let mut it = rest.iter();
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--dns" => opts.dns.push(value.clone()),
            "--ip" => opts.ips.push(
                value
                    .parse()
                    .map_err(|_| format!("--ip {value}: not an IP address"))?,
            ),
            "--lifetime" => {
                let secs: u64 = value
                    .parse()
                    .map_err(|_| format!("--lifetime {value}: not a number of seconds"))?;
                opts.lifetime = Duration::from_secs(secs);
            }
            other => return Err(format!("unknown option {other}\n{USAGE}")),
        }
    }
    Ok(opts)
}

fn identity(s: &str) -> Result<Identity, String> {
    s.parse().map_err(|e| format!("{e}"))
}

fn err(e: PkiError) -> String {
    e.to_string()
}

fn secs(t: std::time::SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

fn run(args: &[String]) -> Result<(), String> {
    match args {
        [cmd, dir, namespace] if cmd == "init" => {
            let dir = PathBuf::from(dir);
            if dir.join("ca.crt").exists() {
                DevPki::open(&dir).map_err(err)?;
            } else {
                DevPki::create(&dir, namespace).map_err(err)?;
            }
            println!("{}", dir.join("ca.crt").display());
            Ok(())
        }
        [cmd, dir, name, id, rest @ ..] if cmd == "server" => {
            let opts = options(rest)?;
            let pki = DevPki::open(dir).map_err(err)?;
            let id = identity(id)?;
            let names = if opts.dns.is_empty() && opts.ips.is_empty() {
                ServerNames {
                    dns: vec!["localhost".into()],
                    ips: vec![Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()],
                }
            } else {
                ServerNames {
                    dns: opts.dns,
                    ips: opts.ips,
                }
            };
            let files = pki
                .server_with(name, &id, &names, Validity::starting_now(opts.lifetime))
                .map_err(err)?;
            println!("{}\n{}", files.cert.display(), files.key.display());
            Ok(())
        }
        [cmd, dir, name, id, rest @ ..] if cmd == "client" => {
            let opts = options(rest)?;
            if !opts.dns.is_empty() || !opts.ips.is_empty() {
                return Err("client certificates carry no --dns/--ip".into());
            }
            let pki = DevPki::open(dir).map_err(err)?;
            let files = pki
                .client_with(name, &identity(id)?, Validity::starting_now(opts.lifetime))
                .map_err(err)?;
            println!("{}\n{}", files.cert.display(), files.key.display());
            Ok(())
        }
        [cmd, file] if cmd == "inspect" => {
            let bytes = std::fs::read(file).map_err(|e| format!("{file}: {e}"))?;
            let certs: Vec<CertificateDer<'static>> =
                pem::certs_from_pem(&bytes, file).map_err(err)?;
            let info = inspect(&certs[0]).map_err(err)?;
            match &info.identity {
                Some(id) => println!("identity: {id}"),
                None => println!("identity: (none)"),
            }
            println!("ca: {}", info.is_ca);
            println!("not_before: {}", secs(info.validity.not_before));
            println!("not_after: {}", secs(info.validity.not_after));
            println!("renew_after: {}", secs(info.validity.renew_after()));
            for dns in &info.dns_names {
                println!("dns: {dns}");
            }
            for ip in &info.ips {
                println!("ip: {ip}");
            }
            Ok(())
        }
        _ => Err(USAGE.into()),
    }
}
