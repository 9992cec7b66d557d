//! Project commands: `cargo xtask test` (install what is missing, then fmt, clippy, the wasm build
//! of the domain, and every test) and `cargo xtask run` (the product on demo data).

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

type Result<T = ()> = std::result::Result<T, String>;

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let outcome = match args.first().map(String::as_str) {
        Some("test") => test(),
        Some("run") => run(),
        Some("bench") => bench(),
        _ => Err("usage: cargo xtask <test|run|bench>\n  test   install what is missing, then fmt, clippy, wasm build and all tests\n  run    the product on demo data\n  bench  the replica benchmark (10k conversations, 500k messages)".to_owned()),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
}

/// Builds go to one target directory outside the clone, so CI and fresh clones reuse it.
fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let home = env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
            home.join(".cache").join("crewdesk-target")
        }
    }
}

fn cargo(args: &[&str]) -> Result {
    step("cargo", args, &[])
}

fn step(program: &str, args: &[&str], envs: &[(&str, &str)]) -> Result {
    println!("\n==> {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .envs(envs.iter().copied())
        .env("CARGO_TARGET_DIR", target_dir())
        .current_dir(root())
        .status()
        .map_err(|e| format!("could not start {program}: {e}"))?;
    if status.success() { Ok(()) } else { Err(format!("`{program} {}` failed ({status})", args.join(" "))) }
}

fn output_ok(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Installs the toolchain pieces the tests need, only when missing.
fn prerequisites() -> Result {
    let components = output_ok("rustup", &["component", "list", "--installed"]).unwrap_or_default();
    for component in ["rustfmt", "clippy"] {
        if !components.lines().any(|l| l.starts_with(component)) {
            step("rustup", &["component", "add", component], &[])?;
        }
    }
    let targets = output_ok("rustup", &["target", "list", "--installed"]).unwrap_or_default();
    if !targets.lines().any(|l| l.trim() == "wasm32-unknown-unknown") {
        step("rustup", &["target", "add", "wasm32-unknown-unknown"], &[])?;
    }
    // The interop tests drive unmodified npm automerge-repo clients with Node.js.
    if output_ok("node", &["--version"]).is_none() {
        apt(&["nodejs", "npm"])?;
    }
    if !root().join("tests/interop/node_modules/@automerge/automerge-repo").exists() {
        // `npm install` with the committed lock file (`npm ci` trips over optional native packages).
        step("npm", &["install", "--prefix", "tests/interop", "--no-audit", "--no-fund"], &[])?;
    }
    Ok(())
}

/// Installs Debian packages that are missing (one `apt-get update` first).
fn apt(packages: &[&str]) -> Result {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| output_ok("dpkg", &["-s", p]).is_none()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    step("apt-get", &["update", "-qq"], &[])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(&missing);
    step("apt-get", &args, &[("DEBIAN_FRONTEND", "noninteractive")])
}

fn test() -> Result {
    prerequisites()?;
    cargo(&["fmt", "--all", "--check"])?;
    cargo(&["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])?;
    // The domain rules also compile for the browser (the UI reuses them).
    cargo(&[
        "clippy",
        "-p",
        "crewdesk",
        "--no-default-features",
        "--target",
        "wasm32-unknown-unknown",
        "--",
        "-D",
        "warnings",
    ])?;
    cargo(&["test", "--workspace"])?;
    println!("\nAll checks and tests passed.");
    Ok(())
}

fn bench() -> Result {
    cargo(&["bench", "-p", "crewdesk", "--bench", "replica"])
}

fn run() -> Result {
    prerequisites()?;
    cargo(&["run", "-p", "crewdesk", "--example", "desk"])
}
