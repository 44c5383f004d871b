//! Files the gateway keeps: the access log (SIGUSR1 reopens it, failed writes are counted and
//! reported, a bad path stops the start), `state_dir` (relative to the config file, corrupt
//! or unusable state stops the start with one line), and the reload notes for settings bound
//! at start.

mod common;

use common::*;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

const MOCK: &str = r#"
[[apis]]
name = "m"
[[apis.routes]]
route = "GET /{p}"
integration = { type = "mock", status = 200, body = "ok" }
"#;

/// A config with its own `[server]` table: `extra_server` goes into it, `extra` after it.
fn server_config(extra_server: &str, extra: &str) -> String {
    format!(
        "[server]\nlisten = [\"@LISTEN@\"]\nworkers = 1\nshutdown_timeout_ms = 2000\n{extra_server}\n[admin]\nlisten = \"@ADMIN@\"\n{extra}\n{MOCK}"
    )
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// Starts a gateway that is expected to refuse to start: returns its exit status line and
/// its stderr.
fn start_failure(toml: &str) -> (String, String) {
    match Gateway::try_start(toml) {
        Ok(g) => panic!("the gateway started; stderr:\n{}", g.stderr()),
        Err(e) => {
            let (status, err) = e.split_once("; stderr:\n").unwrap_or((&e, ""));
            (status.to_string(), err.to_string())
        }
    }
}

/// The non-empty lines of `err`.
fn lines(err: &str) -> Vec<&str> {
    err.lines().filter(|l| !l.trim().is_empty()).collect()
}

fn admin_post(addr: SocketAddr, path: &str, body: &str) -> RawResponse {
    let mut c = Client::connect(addr);
    c.send(
        format!(
            "POST {path} HTTP/1.1\r\nHost: admin\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    );
    c.read_response().expect("admin response")
}

#[test]
fn sigusr1_reopens_the_access_log_and_the_gateway_lives_on() {
    let mut gw = Gateway::start(&server_config(
        "state_dir = \"@DIR@/state\"",
        "[access_log]\npath = \"@DIR@/access.log\"",
    ));
    let log = gw.dir.join("access.log");
    let rotated = gw.dir.join("access.log.1");
    assert_eq!(gw.get("/before").status, 200);
    assert!(
        wait_until(Duration::from_secs(5), || read(&log).contains("/before")),
        "first line never written: {:?}",
        read(&log)
    );
    // logrotate: mv, then kill -USR1.
    std::fs::rename(&log, &rotated).unwrap();
    gw.kill_sig("USR1");
    assert!(
        wait_until(Duration::from_secs(5), || log.exists()),
        "no new file at the log's path after SIGUSR1; stderr:\n{}",
        gw.stderr()
    );
    assert_eq!(gw.get("/after").status, 200);
    assert!(
        wait_until(Duration::from_secs(5), || read(&log).contains("/after")),
        "the new line is not in the new file; new: {:?} rotated: {:?}",
        read(&log),
        read(&rotated)
    );
    assert!(read(&rotated).contains("/before"));
    assert!(!read(&rotated).contains("/after"));
    assert!(!read(&log).contains("/before"));
    // Still serving, and a second SIGUSR1 does no harm either.
    gw.kill_sig("USR1");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        gw.is_alive(),
        "SIGUSR1 stopped the gateway: {}",
        gw.stderr()
    );
    assert_eq!(gw.get("/again").status, 200);
    assert!(wait_until(Duration::from_secs(5), || read(&log).contains("/again")));
    // SIGTERM still drains and exits 0.
    gw.terminate();
    let st = gw
        .wait_exit(Duration::from_secs(10))
        .expect("exit after SIGTERM");
    assert_eq!(st.code(), Some(0), "stderr:\n{}", gw.stderr());
}

#[test]
fn access_log_write_failures_are_counted_and_reported_once() {
    let gw = Gateway::start(&server_config(
        "state_dir = \"@DIR@/state\"",
        "[access_log]\npath = \"/dev/full\"",
    ));
    let dropped = |gw: &Gateway| {
        metric_value(&gw.metrics(), "ringgate_access_log_dropped_total", &[]).unwrap_or(-1.0)
    };
    for i in 0..3 {
        assert_eq!(gw.get(&format!("/r{i}")).status, 200);
    }
    assert!(
        wait_until(Duration::from_secs(5), || dropped(&gw) >= 3.0),
        "metric: {}",
        dropped(&gw)
    );
    let reports = |gw: &Gateway| {
        gw.stderr()
            .lines()
            .filter(|l| l.contains("cannot write access log /dev/full"))
            .count()
    };
    assert_eq!(reports(&gw), 1, "stderr:\n{}", gw.stderr());
    // More failures within 10 s: counted, not reported again.
    for i in 0..3 {
        assert_eq!(gw.get(&format!("/s{i}")).status, 200);
    }
    assert!(
        wait_until(Duration::from_secs(5), || dropped(&gw) >= 6.0),
        "metric: {}",
        dropped(&gw)
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(reports(&gw), 1, "stderr:\n{}", gw.stderr());
}

#[test]
fn the_dropped_lines_metric_is_there_without_failures() {
    let gw = Gateway::start(MOCK);
    assert_eq!(
        metric_value(&gw.metrics(), "ringgate_access_log_dropped_total", &[]),
        Some(0.0)
    );
}

#[test]
fn a_bad_access_log_path_stops_the_start_with_one_line_naming_it() {
    let cfg = server_config(
        "state_dir = \"@DIR@/state\"",
        "[access_log]\npath = \"@DIR@/no/such/dir/access.log\"",
    );
    let (status, err) = start_failure(&cfg);
    assert!(status.contains("exit status: 1"), "{status}");
    let l = lines(&err);
    assert_eq!(l.len(), 1, "stderr:\n{err}");
    assert!(l[0].contains("/no/such/dir/access.log"), "{err}");
    // With the line of the key, as every config error.
    assert!(l[0].contains(":9: key `access_log.path`"), "{err}");
    // --check says so too.
    let (out, _) = check(&cfg);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(err.contains("/no/such/dir/access.log"), "{err}");
    assert!(err.contains(":9: key `access_log.path`"), "{err}");
    assert_eq!(lines(&err).len(), 1, "{err}");
}

#[test]
fn relative_state_dir_and_access_log_are_next_to_the_config_file() {
    let cwd = temp_dir("other-cwd");
    let cfg = server_config(
        "state_dir = \"state-rel\"",
        "[access_log]\npath = \"access-rel.log\"",
    );
    let gw = Gateway::try_start_in(&cfg, Some(&cwd)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(gw.get("/x").status, 200);
    let r = admin_post(gw.admin_addr, "/api-keys", r#"{"name":"rt"}"#);
    assert_eq!(r.status, 201, "{}", r.text());
    let log = gw.dir.join("access-rel.log");
    assert!(
        wait_until(Duration::from_secs(5), || read(&log).contains("\"/x\"")),
        "no access log next to the config; cwd holds: {:?}",
        std::fs::read_dir(&cwd)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect::<Vec<_>>()
    );
    assert!(gw.dir.join("state-rel/api_keys.json").is_file());
    assert!(!cwd.join("state-rel").exists());
    assert!(!cwd.join("access-rel.log").exists());
    drop(gw);
    let _ = std::fs::remove_dir_all(&cwd);
}

#[test]
fn a_corrupt_usage_file_stops_the_start_with_one_line() {
    let state = temp_dir("corrupt-usage");
    std::fs::write(state.join("usage-plans.json"), "{\"counters\":[{garbage").unwrap();
    let cfg = server_config(&format!("state_dir = \"{}\"", state.display()), "");
    let (status, err) = start_failure(&cfg);
    assert!(status.contains("exit status: 1"), "{status}");
    let l = lines(&err);
    assert_eq!(l.len(), 1, "stderr:\n{err}");
    assert!(
        l[0].contains(&state.join("usage-plans.json").display().to_string()),
        "{err}"
    );
    // Valid JSON that is not a usage file is refused too; the file is left as it was.
    std::fs::write(state.join("usage-plans.json"), "[]").unwrap();
    let (status, err) = start_failure(&cfg);
    assert!(status.contains("exit status: 1"), "{status}");
    assert_eq!(lines(&err).len(), 1, "stderr:\n{err}");
    assert!(err.contains("usage-plans.json"), "{err}");
    assert_eq!(read(&state.join("usage-plans.json")), "[]");
    let _ = std::fs::remove_dir_all(&state);
}

#[test]
fn a_state_dir_that_is_a_file_is_one_clear_error_and_a_missing_parent_is_created() {
    let tmp = temp_dir("state-file");
    let file = tmp.join("plain-file");
    std::fs::write(&file, "x").unwrap();
    for dir in [file.clone(), file.join("below")] {
        let cfg = server_config(&format!("state_dir = \"{}\"", dir.display()), "");
        let (out, _) = check(&cfg);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "--check passed: {err}");
        assert!(err.contains("server.state_dir"), "{err}");
        assert!(err.contains(&file.display().to_string()), "{err}");
        assert_eq!(lines(&err).len(), 1, "{err}");
        let (status, err) = start_failure(&cfg);
        assert!(status.contains("exit status: 1"), "{status}");
        assert_eq!(lines(&err).len(), 1, "stderr:\n{err}");
        assert!(err.contains(&file.display().to_string()), "{err}");
    }
    // A state_dir whose parents are missing is made, and keys persist in it.
    let deep = tmp.join("a/b/state");
    let gw = Gateway::start(&server_config(
        &format!("state_dir = \"{}\"", deep.display()),
        "",
    ));
    assert!(deep.is_dir());
    let r = admin_post(gw.admin_addr, "/api-keys", r#"{"name":"rt"}"#);
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(deep.join("api_keys.json").is_file());
    drop(gw);
    let _ = std::fs::remove_dir_all(&tmp);
}

#[test]
fn reload_notes_compare_with_what_the_process_started_with() {
    let base = server_config(
        "state_dir = \"@DIR@/state\"",
        "[access_log]\npath = \"@DIR@/access.log\"",
    );
    let gw = Gateway::start(&base);
    // Nothing bound at start changed.
    assert_eq!(reload_notes(&gw), Vec::<String>::new());

    // state_dir: needs a restart, and keys keep going to the running one.
    gw.write_config(&base.replace("@DIR@/state", "@DIR@/state2"));
    let notes = reload_notes(&gw);
    assert!(
        notes
            .iter()
            .any(|n| n.contains("server.state_dir") && n.contains("restart")),
        "{notes:?}"
    );
    // The admin reload logs its notes, as SIGHUP does.
    assert!(wait_until(Duration::from_secs(2), || {
        gw.stderr()
            .lines()
            .any(|l| l.contains("note: ") && l.contains("server.state_dir"))
    }));
    let r = admin_post(gw.admin_addr, "/api-keys", r#"{"name":"rt"}"#);
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(gw.dir.join("state/api_keys.json").is_file());
    assert!(!gw.dir.join("state2").exists());
    // The same changed config again: still not what runs, still noted.
    let notes = reload_notes(&gw);
    assert!(
        notes.iter().any(|n| n.contains("server.state_dir")),
        "{notes:?}"
    );

    // Access log path: noted.
    gw.write_config(&base.replace("@DIR@/access.log", "@DIR@/other.log"));
    let notes = reload_notes(&gw);
    assert!(
        notes.iter().any(|n| n.contains("access_log.path")),
        "{notes:?}"
    );

    // listen: a new address is noted; putting the running one back is not a change.
    let other = SocketAddr::from(([127, 0, 0, 1], free_port()));
    gw.write_config(&base.replace("@LISTEN@", &other.to_string()));
    let notes = reload_notes(&gw);
    assert_eq!(
        notes,
        ["server.listen takes effect at the next restart"],
        "{notes:?}"
    );
    // Each note names what changed: only the keys that differ.
    gw.write_config(&base.replace("workers = 1", "workers = 2"));
    assert_eq!(
        reload_notes(&gw),
        ["server.workers takes effect at the next restart"]
    );
    gw.write_config(
        &base
            .replace("workers = 1", "workers = 2")
            .replace("@LISTEN@", &other.to_string()),
    );
    assert_eq!(
        reload_notes(&gw),
        ["server.listen and server.workers take effect at the next restart"]
    );
    gw.write_config(&base);
    assert_eq!(reload_notes(&gw), Vec::<String>::new());
    assert_eq!(gw.get("/still").status, 200);
}

/// Runs the binary with `args` as an unprivileged user (`nobody`, through `setpriv`, when the
/// tests run as root; as the test's own user otherwise), so that permissions apply.
fn run_unprivileged(args: &[&std::ffi::OsStr]) -> std::process::Output {
    // SAFETY: `geteuid` has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let bin = std::ffi::OsStr::new(env!("CARGO_BIN_EXE_ringgate"));
    let mut cmd = if root {
        let mut c = std::process::Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(bin);
        c
    } else {
        std::process::Command::new(bin)
    };
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run ringgate (setpriv comes with util-linux)")
}

#[test]
fn a_state_dir_or_access_log_in_a_directory_the_user_cannot_write_fails_check_and_start_alike() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = temp_dir("unwritable");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    let ro = tmp.join("ro");
    std::fs::create_dir(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    let writable = tmp.join("rw");
    std::fs::create_dir(&writable).unwrap();
    std::fs::set_permissions(&writable, std::fs::Permissions::from_mode(0o777)).unwrap();
    let cases = [
        // Missing, under a directory it cannot create entries in.
        (
            format!("state_dir = \"{}/state\"", ro.display()),
            String::new(),
            "server.state_dir",
        ),
        // Existing, but the gateway could not make its files in it.
        (
            format!("state_dir = \"{}\"", ro.display()),
            String::new(),
            "server.state_dir",
        ),
        (
            format!("state_dir = \"{}/state\"", writable.display()),
            format!("[access_log]\npath = \"{}/access.log\"", ro.display()),
            "access_log.path",
        ),
    ];
    for (i, (server, extra, key)) in cases.iter().enumerate() {
        let path = tmp.join(format!("gw{i}.toml"));
        let text = server_config(server, extra)
            .replace("@LISTEN@", &format!("127.0.0.1:{}", free_port()))
            .replace("@ADMIN@", &format!("127.0.0.1:{}", free_port()));
        std::fs::write(&path, text).unwrap();
        for check in [true, false] {
            let mut args = vec![std::ffi::OsStr::new("--config"), path.as_os_str()];
            if check {
                args.insert(0, std::ffi::OsStr::new("--check"));
            }
            let out = run_unprivileged(&args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "case {i}, check {check}: {err}");
            assert_eq!(lines(&err).len(), 1, "case {i}, check {check}: {err}");
            assert!(
                err.contains(&format!("key `{key}`")) && err.contains(&ro.display().to_string()),
                "case {i}, check {check}: {err}"
            );
            assert!(err.contains("ermission denied"), "case {i}: {err}");
        }
    }
    assert!(
        !writable.join("state").exists(),
        "--check or a failed start made state_dir"
    );
    let _ = std::fs::remove_dir_all(&tmp);
}
