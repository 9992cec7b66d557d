//! Project commands: `cargo xtask test` (install what is missing, then fmt, clippy, the wasm build
//! of the domain, every test, and a short fuzzing run), `cargo xtask run` (the product on demo
//! data) and `cargo xtask fuzz` (the fuzz targets of `fuzz/`, see FUZZING.md).

use std::env;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

type Result<T = ()> = std::result::Result<T, String>;

fn main() -> ExitCode {
    let args: Vec<String> = env::args().skip(1).collect();
    let outcome = match args.first().map(String::as_str) {
        Some("test") => test(),
        Some("bench-relay") => bench_relay(&args[1..]),
        Some("run") => run(),
        Some("bench") => bench(),
        Some("bench-desk") => bench_desk(),
        Some("fuzz") => fuzz(&args[1..]),
        Some("sim") => sim(&args[1..]),
        _ => Err("usage: cargo xtask <test|run|bench|bench-desk|bench-relay|fuzz|sim>\n  test   install what is missing, then fmt, clippy, wasm build, all tests and 30 s of fuzzing per target\n  run    the product on demo data\n  bench  the replica benchmark (10k conversations, 500k messages)\n  bench-desk  the desktop app at 10k conversations, timed in its window (release build, Xvfb)\n  bench-relay [--quota CORES] [--scale-out]  the relay benchmark against the reference server, and scale-out on PostgreSQL with each instance held to CORES of CPU (default 0.25; 0: uncapped); --scale-out: only scale-out\n  fuzz [--seconds N] [TARGET]  each fuzz target (or TARGET) for N seconds (default 60), one at a time\n  sim [--seeds N] [--first S] [--seed S]  the seeded simulator of the sync protocol on N seeds (default 10,000), or one seed with its whole trace".to_owned()),
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

/// Debian packages: Tauri's WebKitGTK stack, the E2E stack (Xvfb, WebKitWebDriver, screenshots),
/// a color emoji font for the UI's icons, Python for the E2E driver.
const APT_PACKAGES: &[&str] = &[
    "libwebkit2gtk-4.1-dev",
    "libgtk-3-dev",
    "libayatana-appindicator3-dev",
    "librsvg2-dev",
    "libsoup-3.0-dev",
    "libssl-dev",
    "pkg-config",
    "build-essential",
    "xvfb",
    "xauth",
    "webkit2gtk-driver",
    "imagemagick",
    "chromium",
    "chromium-driver",
    "fonts-noto-color-emoji",
    "python3-venv",
    "postgresql",
    // The desktop keeps its token in the Secret Service (libdbus); the E2E runs under a real one.
    "libdbus-1-dev",
    "dbus",
    "gnome-keyring",
];

/// The wasm-bindgen CLI must equal the `wasm-bindgen` crate pinned in `ui/Cargo.toml`.
const WASM_BINDGEN: &str = "0.2.130";

fn cargo_bin(name: &str) -> PathBuf {
    let home = env::var_os("CARGO_HOME").map_or_else(
        || env::var_os("HOME").map_or_else(|| PathBuf::from("/root"), PathBuf::from).join(".cargo"),
        PathBuf::from,
    );
    home.join("bin").join(name)
}

/// Tools built from crates.io, each installed only when missing (trunk takes ~10 min cold).
fn tools() -> Result {
    let wb = output_ok("wasm-bindgen", &["--version"]).unwrap_or_default();
    if !wb.contains(WASM_BINDGEN) {
        step("cargo", &["install", "wasm-bindgen-cli", "--version", &format!("={WASM_BINDGEN}")], &[])?;
    }
    if output_ok("trunk", &["--version"]).is_none() {
        // trunk 0.22 declares a newer rustc than it needs; it builds and runs on this one.
        step("cargo", &["install", "trunk", "--locked", "--ignore-rust-version"], &[])?;
    }
    if output_ok("tauri-driver", &["--help"]).is_none() && !cargo_bin("tauri-driver").exists() {
        step("cargo", &["install", "tauri-driver", "--version", "^2", "--locked"], &[])?;
    }
    Ok(())
}

/// Builds the UI into `ui/dist` (the desktop shell embeds it at compile time).
fn build_ui() -> Result {
    println!("\n==> trunk build (ui)");
    let status = Command::new("trunk")
        .arg("build")
        .env("CARGO_TARGET_DIR", target_dir())
        .current_dir(root().join("ui"))
        .status()
        .map_err(|e| format!("could not start trunk: {e}"))?;
    if status.success() { Ok(()) } else { Err("the UI build failed".into()) }
}

/// Installs the toolchain pieces the tests need, only when missing.
fn prerequisites() -> Result {
    apt(APT_PACKAGES)?;
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
    tools()?;
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
    // A real IMAP server for the email channel's tests (each test starts its own on loopback).
    apt(&["dovecot-imapd"])?;
    build_ui()?;
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
    // A throwaway PostgreSQL cluster: the relay suite runs on SQLite and again on PostgreSQL, and
    // the several-instances tests need it.
    let pg = Postgres::start()?;
    let url = pg.url.clone();
    step("cargo", &["test", "--workspace"], &[("CREWDESK_TEST_POSTGRES", &url)])?;
    let mut args = vec!["test", "-p", "system-tests"];
    for suite in RELAY_SUITE {
        args.extend(["--test", suite]);
    }
    step("cargo", &args, &[("CREWDESK_TEST_POSTGRES", &url), ("CREWDESK_TEST_STORE", "postgres")])?;
    drop(pg);
    run_sim(SIM_SEEDS, 0)?;
    e2e()?;
    run_fuzz(30, None)?;
    println!("\nAll checks and tests passed.");
    Ok(())
}

/// The system tests that make up the relay's suite, run once per storage backend.
const RELAY_SUITE: &[&str] = &[
    "relay",
    "kill",
    "schedule",
    "whatsapp",
    "attachments",
    "widget",
    "connections",
    "templates",
    "transfer",
    "email",
];

/// A PostgreSQL cluster in a temporary directory on a free loopback port, stopped when dropped.
/// PostgreSQL refuses to run as root, so as root it runs as the `postgres` user.
struct Postgres {
    dir: PathBuf,
    bin: PathBuf,
    pub url: String,
}

impl Postgres {
    fn start() -> std::result::Result<Postgres, String> {
        let bin = postgres_bin()?;
        let dir = env::temp_dir().join(format!("crewdesk-test-postgres-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("no free port: {e}"))?
            .port();
        if as_root() {
            step("chown", &["postgres:postgres", &dir.to_string_lossy()], &[])?;
        }
        let data = dir.join("data");
        let pg = Postgres { dir: dir.clone(), bin: bin.clone(), url: format!("postgres://crewdesk@127.0.0.1:{port}") };
        pg.run("initdb", &["-D", &data.to_string_lossy(), "-A", "trust", "-U", "crewdesk", "-E", "UTF8", "--no-sync"])?;
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=400 -c shared_buffers=64MB",
            dir.display()
        );
        pg.run(
            "pg_ctl",
            &[
                "-D",
                &data.to_string_lossy(),
                "-l",
                &dir.join("server.log").to_string_lossy(),
                "-o",
                &options,
                "-w",
                "start",
            ],
        )?;
        println!("PostgreSQL for the tests: {}", pg.url);
        Ok(pg)
    }

    fn run(&self, tool: &str, args: &[&str]) -> Result {
        let program = self.bin.join(tool);
        let program = program.to_string_lossy();
        if as_root() {
            let mut all = vec!["-u", "postgres", "--", &*program];
            all.extend(args);
            step("runuser", &all, &[])
        } else {
            step(&program, args, &[])
        }
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = self.run("pg_ctl", &["-D", &data.to_string_lossy(), "-m", "immediate", "-w", "stop"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn as_root() -> bool {
    output_ok("id", &["-u"]).is_some_and(|u| u.trim() == "0")
}

/// Debian keeps the server binaries in /usr/lib/postgresql/<version>/bin.
fn postgres_bin() -> std::result::Result<PathBuf, String> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map_err(|e| format!("PostgreSQL is not installed (/usr/lib/postgresql: {e})"))?
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).ok_or_else(|| "no initdb under /usr/lib/postgresql".to_owned())
}

/// The relay benchmark, with its scale-out part on a throwaway PostgreSQL cluster.
/// `cargo xtask bench-relay [--quota CORES] [--scale-out]`.
fn bench_relay(args: &[String]) -> Result {
    let usage = "usage: cargo xtask bench-relay [--quota CORES] [--scale-out]";
    let (mut quota, mut scale_out_only) = ("0.25".to_owned(), false);
    let mut args = args.iter();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--quota" => match args.next().filter(|q| q.parse::<f64>().is_ok_and(|q| (0.0..=64.0).contains(&q))) {
                Some(q) => quota = q.clone(),
                None => return Err(format!("{usage} (--quota takes a number of cores, such as 0.25)")),
            },
            "--scale-out" => scale_out_only = true,
            other => return Err(format!("{usage} (not `{other}`)")),
        }
    }
    let pg = Postgres::start()?;
    let mut envs = vec![("CREWDESK_BENCH_POSTGRES", pg.url.as_str()), ("CREWDESK_BENCH_CPU_QUOTA", quota.as_str())];
    if scale_out_only {
        envs.push(("CREWDESK_BENCH_SCALE_OUT_ONLY", "1"));
    }
    step("cargo", &["bench", "-p", "sync-server", "--bench", "relay"], &envs)
}

fn bench() -> Result {
    cargo(&["bench", "-p", "crewdesk", "--bench", "replica"])
}

fn run() -> Result {
    prerequisites()?;
    build_ui()?;
    cargo(&["build", "-p", "sync-server", "-p", "crewdesk-desktop", "--features", "crewdesk-desktop/custom-protocol"])?;
    let bin = target_dir().join("debug");
    let home = env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    let demo = home.join(".local/share/crewdesk-demo");
    let relay_data = demo.join("relay");
    // Fresh demo data on every run, so the statuses match the clock.
    let _ = std::fs::remove_dir_all(&demo);
    std::fs::create_dir_all(&demo).map_err(|e| e.to_string())?;
    let relay_bin = bin.join("sync-server");
    let seeded = Command::new(&relay_bin)
        .args(["--data-dir".as_ref(), relay_data.as_os_str(), "seed-demo".as_ref()])
        .output()
        .map_err(|e| format!("could not start the relay: {e}"))?;
    if !seeded.status.success() {
        return Err(format!("seeding the demo failed: {}", String::from_utf8_lossy(&seeded.stderr)));
    }
    let tokens: Vec<(String, String)> = String::from_utf8_lossy(&seeded.stdout)
        .lines()
        .filter_map(|l| l.split_once(' ').map(|(a, t)| (a.to_owned(), t.to_owned())))
        .collect();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| e.to_string())?;
    let url = format!("http://127.0.0.1:{port}");
    // The widget demo page runs on its own origin, like a team's website, allowed for Sales.
    let demo_page = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let page_url = format!("http://127.0.0.1:{}", demo_page.local_addr().map_err(|e| e.to_string())?.port());
    let allowed = Command::new(&relay_bin)
        .args(["--data-dir".as_ref(), relay_data.as_os_str(), "team".as_ref(), "sales".as_ref()])
        .args(["--widget-origin", &page_url])
        .output()
        .map_err(|e| format!("could not start the relay: {e}"))?;
    let key = String::from_utf8_lossy(&allowed.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("widget key ")?.split(';').next().map(str::to_owned))
        .ok_or_else(|| format!("no widget key for the demo: {}", String::from_utf8_lossy(&allowed.stderr)))?;
    let page = include_str!("../../sync-server/widget/demo.html").replace("{{RELAY}}", &url).replace("{{KEY}}", &key);
    std::thread::spawn(move || serve_demo_page(demo_page, page));
    let mut relay = Command::new(&relay_bin)
        .args([
            "--data-dir".as_ref(),
            relay_data.as_os_str(),
            "serve".as_ref(),
            "--listen".as_ref(),
            format!("127.0.0.1:{port}").as_ref(),
        ])
        .spawn()
        .map_err(|e| format!("could not start the relay: {e}"))?;
    std::thread::sleep(std::time::Duration::from_millis(500));
    // A few customers chat through the Sales widget while the demo runs (Online in the desk, and
    // conversations that keep moving through Waiting, Soon to be and Overdue).
    let mut customers = Command::new(&relay_bin)
        .args(["demo-customers", "--relay", &url, "--key", &key, "--count", "3"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("could not start the demo customers: {e}"))?;
    let token = |agent: &str| tokens.iter().find(|(a, _)| a == agent).map(|(_, t)| t.clone()).unwrap_or_default();
    println!("\nCrewdesk demo: relay at {url} (data in {})", relay_data.display());
    println!("The app opens signed in as bob (representative in Sales and Support).");
    println!("Chat as a customer of Sales in a browser: {page_url} (the widget key of Sales is {key})");
    println!("Three demo customers are chatting through the Sales widget too (Online in the desk).");
    println!("Open a second window as another agent, each with its own data directory:");
    for (agent, t) in &tokens {
        println!(
            "  {agent:<6} XDG_DATA_HOME=/tmp/crewdesk-{agent} XDG_CONFIG_HOME=/tmp/crewdesk-{agent} CREWDESK_RELAY_URL={url} CREWDESK_TOKEN={t} {}",
            bin.join("crewdesk").display()
        );
    }
    let mut app = Command::new(bin.join("crewdesk"));
    app.env("CREWDESK_RELAY_URL", &url)
        .env("CREWDESK_TOKEN", token("bob"))
        .env("XDG_DATA_HOME", demo.join("bob/data"))
        .env("XDG_CONFIG_HOME", demo.join("bob/config"));
    if env::var_os("DISPLAY").is_none() && env::var_os("WAYLAND_DISPLAY").is_none() {
        return Err(format!("no display: run it in a desktop session (the relay was at {url})")).inspect_err(|_| {
            let _ = customers.kill();
            let _ = relay.kill();
        });
    }
    let status = app.status().map_err(|e| format!("could not start the app: {e}"));
    let _ = customers.kill();
    let _ = customers.wait();
    let _ = relay.kill();
    let _ = relay.wait();
    status.map(|_| ())
}

/// Answers every request on `listener` with the demo page (the demo's stand-in for a shop's website).
fn serve_demo_page(listener: std::net::TcpListener, page: String) {
    use std::io::{Read, Write};
    for mut stream in listener.incoming().flatten() {
        let _ = stream.set_read_timeout(Some(std::time::Duration::from_secs(2)));
        let mut head = [0_u8; 4096];
        let _ = stream.read(&mut head);
        let response = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{page}",
            page.len()
        );
        let _ = stream.write_all(response.as_bytes());
    }
}

/// End-to-end: the real desktop app under Xvfb, driven through tauri-driver and WebKitWebDriver
/// by `tests/e2e/desk_e2e.py` (selenium in a virtualenv), against a real relay.
fn e2e() -> Result {
    cargo(&["build", "-p", "sync-server", "-p", "crewdesk-desktop", "--features", "crewdesk-desktop/custom-protocol"])?;
    let artifacts = root().join("artifacts");
    let artifacts = artifacts.to_str().unwrap_or("artifacts");
    desktop_script("desk_e2e.py", "debug", &["--artifacts", artifacts])?;
    // The desk at 10,000 conversations: scroll to the last row, search, open, reconnect.
    desktop_script("desk_scale.py", "debug", &["--artifacts", artifacts])
}

/// `cargo xtask bench-desk`: the desktop app measured at 10,000 conversations / 500,000 messages
/// (release build) in its window, printed against the targets.
fn bench_desk() -> Result {
    prerequisites()?;
    println!("\n==> trunk build --release (ui)");
    let status = Command::new("trunk")
        .args(["build", "--release"])
        .env("CARGO_TARGET_DIR", target_dir())
        .current_dir(root().join("ui"))
        .status()
        .map_err(|e| format!("could not start trunk: {e}"))?;
    if !status.success() {
        return Err("the UI build failed".into());
    }
    cargo(&[
        "build",
        "--release",
        "-p",
        "sync-server",
        "-p",
        "crewdesk-desktop",
        "--features",
        "crewdesk-desktop/custom-protocol",
    ])?;
    let artifacts = root().join("target/bench-desk");
    std::fs::create_dir_all(&artifacts).map_err(|e| e.to_string())?;
    let json = artifacts.join("figures.json");
    desktop_script(
        "desk_scale.py",
        "release",
        &[
            "--bench",
            "--build",
            "release",
            "--artifacts",
            artifacts.to_str().unwrap_or("target"),
            "--json",
            json.to_str().unwrap_or("figures.json"),
        ],
    )
}

/// Runs one of the desktop scripts of `tests/e2e/` (Python, Selenium) under Xvfb against the
/// `profile` build of the app and the relay, with tauri-driver.
fn desktop_script(script: &str, profile: &str, extra: &[&str]) -> Result {
    let venv = home_cache().join("crewdesk-e2e-venv");
    let python = venv.join("bin/python");
    if !python.exists() {
        step("python3", &["-m", "venv", venv.to_str().unwrap_or("/tmp/venv")], &[])?;
    }
    if output_ok(python.to_str().unwrap_or("python3"), &["-c", "import selenium"]).is_none() {
        step(python.to_str().unwrap_or("python3"), &["-m", "pip", "install", "--quiet", "selenium==4.27.1"], &[])?;
    }
    let bin = target_dir().join(profile);
    let driver = if output_ok("tauri-driver", &["--help"]).is_some() {
        PathBuf::from("tauri-driver")
    } else {
        cargo_bin("tauri-driver")
    };
    // Under a session bus with an unlocked gnome-keyring (a real Secret Service), the desktop keeps
    // its token there; the E2E checks it (CREWDESK_E2E_KEYRING). Without them it checks the file.
    let keyring = output_ok("gnome-keyring-daemon", &["--version"]).is_some()
        && output_ok("dbus-run-session", &["--version"]).is_some();
    let session = "printf crewdesk-e2e | gnome-keyring-daemon --unlock --components=secrets >/dev/null && exec \"$@\"";
    let (script, app, relay) = (root().join("tests/e2e").join(script), bin.join("crewdesk"), bin.join("sync-server"));
    let (program, mut e2e_args) = match keyring {
        true => ("dbus-run-session", vec!["--", "sh", "-c", session, "sh", "xvfb-run"]),
        false => ("xvfb-run", Vec::new()),
    };
    e2e_args.extend([
        "-a",
        "-s",
        "-screen 0 1280x800x24",
        python.to_str().unwrap_or("python3"),
        script.to_str().unwrap_or(""),
        "--app",
        app.to_str().unwrap_or(""),
        "--relay",
        relay.to_str().unwrap_or(""),
        "--driver",
        driver.to_str().unwrap_or("tauri-driver"),
    ]);
    e2e_args.extend(extra);
    step(program, &e2e_args, &[("CREWDESK_E2E_KEYRING", if keyring { "1" } else { "0" })])
}

/// The fuzz targets of `fuzz/` and the sanitizer each is built with. The three that parse raw bytes
/// run under AddressSanitizer, whose allocator hooks let libFuzzer enforce `-malloc_limit_mb` (no
/// length read from a client may turn into a huge allocation). `judge_sequence` makes its changes
/// through automerge's API, so no length comes from its bytes: it runs without a sanitizer, about
/// five times faster (the code it drives forbids `unsafe`).
const FUZZ_TARGETS: &[(&str, &str)] =
    &[("wire_frame", "address"), ("sync_message", "address"), ("judge_sequence", "none"), ("message_body", "address")];

/// `cargo xtask fuzz [--seconds N] [TARGET]`.
/// Seeds the simulator runs in `cargo xtask test` (about 1.5 minutes on 2 cores).
const SIM_SEEDS: u64 = 10_000;

/// `cargo xtask sim [--seeds N] [--first S] [--seed S]`.
fn sim(args: &[String]) -> Result {
    let (mut seeds, mut first, mut one) = (SIM_SEEDS, 0, None);
    let mut args = args.iter();
    let usage = "usage: cargo xtask sim [--seeds N] [--first S] [--seed S]";
    while let Some(arg) = args.next() {
        let mut number = || args.next().and_then(|n| n.parse::<u64>().ok()).ok_or(usage);
        match arg.as_str() {
            "--seeds" => seeds = number()?,
            "--first" => first = number()?,
            "--seed" => one = Some(number()?),
            _ => return Err(usage.to_owned()),
        }
    }
    match one {
        Some(seed) => step(
            "cargo",
            &["test", "--test", "sim", "every_seed", "--", "--nocapture"],
            &[("CREWDESK_SIM_SEED", &seed.to_string())],
        ),
        None => run_sim(seeds, first),
    }
}

/// Runs the simulator's seeds `first..first + seeds` (every core, every invariant checked).
fn run_sim(seeds: u64, first: u64) -> Result {
    step(
        "cargo",
        &["test", "--test", "sim", "every_seed", "--", "--nocapture"],
        &[("CREWDESK_SIM_SEEDS", &seeds.to_string()), ("CREWDESK_SIM_FIRST", &first.to_string())],
    )
}

fn fuzz(args: &[String]) -> Result {
    let mut seconds = 60;
    let mut only = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => {
                seconds = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|n| *n > 0)
                    .ok_or("--seconds takes a number of seconds")?;
            }
            name if only.is_none() && FUZZ_TARGETS.iter().any(|(t, _)| *t == name) => only = Some(name),
            other => {
                let targets: Vec<&str> = FUZZ_TARGETS.iter().map(|(t, _)| *t).collect();
                return Err(format!("usage: cargo xtask fuzz [--seconds N] [{}] (not `{other}`)", targets.join("|")));
            }
        }
    }
    run_fuzz(seconds, only)
}

/// Runs each fuzz target (or only `only`) for `seconds`, one after the other, single process, and
/// fails if any of them found a crash (libFuzzer leaves the input in `fuzz/artifacts/<target>/`).
/// cargo-fuzz needs nightly flags, which `RUSTC_BOOTSTRAP=1` enables on the stable toolchain; the
/// builds go outside the clone so CI reuses them. New inputs go to a corpus kept beside the
/// builds; the committed corpus and the regression inputs are read, never written.
fn run_fuzz(seconds: u64, only: Option<&str>) -> Result {
    if output_ok("cargo", &["fuzz", "--version"]).is_none() {
        step("cargo", &["install", "cargo-fuzz", "--locked"], &[])?;
    }
    let max_time = format!("-max_total_time={seconds}");
    let mut failed = Vec::new();
    for (target, sanitizer) in FUZZ_TARGETS.iter().filter(|(t, _)| only.is_none_or(|o| o == *t)) {
        let target_dir = home_cache().join("crewdesk-fuzz-target").join(sanitizer);
        let corpus = home_cache().join("crewdesk-fuzz-corpus").join(target);
        std::fs::create_dir_all(&corpus).map_err(|e| format!("cannot create {}: {e}", corpus.display()))?;
        let (target_dir, corpus) = (target_dir.to_string_lossy(), corpus.to_string_lossy());
        let mut args = vec!["fuzz", "run", "--fuzz-dir", "fuzz", "--sanitizer", sanitizer, "--target-dir", &target_dir];
        args.extend([*target, &*corpus]);
        let committed = [format!("fuzz/corpus/{target}"), format!("fuzz/regressions/{target}")];
        args.extend(committed.iter().filter(|dir| root().join(dir).is_dir()).map(String::as_str));
        args.extend(["--", &max_time, "-rss_limit_mb=2048", "-malloc_limit_mb=512", "-timeout=10"]);
        if let Err(e) = step("cargo", &args, &[("RUSTC_BOOTSTRAP", "1")]) {
            eprintln!("xtask: fuzz target {target}: {e}");
            failed.push(*target);
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!("fuzzing failed for {} (inputs in fuzz/artifacts/)", failed.join(", ")))
    }
}

fn home_cache() -> PathBuf {
    env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from).join(".cache")
}
