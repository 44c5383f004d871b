//! The `ringgate` command: `ringgate [--config FILE]` runs the gateway, `ringgate --check
//! [--config FILE]` validates the config and prints the route table.

use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage: ringgate [--check] [--config|-c FILE]";

fn main() -> ExitCode {
    let mut config = PathBuf::from("config/ringgate.toml");
    let mut check = false;
    let mut config_given = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--check" => check = true,
            "--config" | "-c" if config_given => {
                // Which one should count is a guess: refused, as an unknown argument is.
                eprintln!("ringgate: --config is given twice. {USAGE}");
                return ExitCode::FAILURE;
            }
            "--config" | "-c" => match args.next() {
                Some(f) => {
                    config = PathBuf::from(f);
                    config_given = true;
                }
                None => {
                    eprintln!("ringgate: --config needs a file. {USAGE}");
                    return ExitCode::FAILURE;
                }
            },
            "--help" | "-h" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            "--version" | "-V" => {
                println!("ringgate {}", env!("CARGO_PKG_VERSION"));
                return ExitCode::SUCCESS;
            }
            other => {
                if let Some(f) = other.strip_prefix("--config=") {
                    if config_given {
                        eprintln!("ringgate: --config is given twice. {USAGE}");
                        return ExitCode::FAILURE;
                    }
                    config = PathBuf::from(f);
                    config_given = true;
                } else {
                    eprintln!("ringgate: unknown argument `{other}`. {USAGE}");
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    let cfg = match ringgate::config::load(&config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ringgate: {e}");
            return ExitCode::FAILURE;
        }
    };
    if check {
        if let Err(e) = cfg.check_paths() {
            eprintln!("ringgate: {e}");
            return ExitCode::FAILURE;
        }
        print!("{}", cfg.routes.describe(&cfg.upstreams));
        for a in &cfg.server.listen {
            println!("listener http://{a}");
        }
        if let Some(t) = &cfg.server.tls {
            print!("{}", t.describe());
        }
        println!(
            "config {} is valid: {} route(s), {} upstream(s)",
            config.display(),
            cfg.routes.routes().len(),
            cfg.upstreams.len()
        );
        return ExitCode::SUCCESS;
    }
    match ringgate::runtime::run(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringgate: {e}");
            ExitCode::FAILURE
        }
    }
}
