//! The operator's tools: the metrics endpoint scraped and checked by `promtool`, and the
//! subcommands that need no kernel.

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use conntrace_tests::{PORT, Proc, Scenario, TempDir, connect, conntrace_bin};

/// A free port on the loopback address (bound, then released for conntrace to take).
fn free_loopback_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

fn scrape(addr: &str) -> String {
    ureq::get(&format!("http://{addr}/metrics"))
        .call()
        .expect("GET /metrics")
        .body_mut()
        .read_to_string()
        .expect("metrics body")
}

#[test]
fn metrics_count_verdicts_and_a_real_prometheus_stores_them() {
    let addr = format!("127.0.0.1:{}", free_loopback_port());
    let Scenario { hosts, ct, .. } =
        Scenario::new().conntrace(&["--port", "3306", "--metrics-addr", &addr]);
    // Nothing listens: two refused connections, seen from both sides.
    let client = connect(&hosts.client, &hosts.server_ip, PORT, &["--count", "2"]);
    client.json_lines(Duration::from_secs(10));
    let client_ns = hosts.client.inode();
    ct.wait_for(Duration::from_secs(3), |l| {
        l.value["netns"] == client_ns && l.value["reason"] == "refused_no_listener"
    });
    std::thread::sleep(Duration::from_millis(300));
    let body = scrape(&addr);
    for line in [
        r#"conntrace_verdicts_total{side="client",outcome="failed",reason="refused_no_listener",port="3306"} 2"#,
        r#"conntrace_verdicts_total{side="server",outcome="failed",reason="refused_no_listener",port="3306"} 2"#,
        "conntrace_lost_events_total 0",
        "conntrace_ring_buffer_size_bytes 4194304",
    ] {
        assert!(
            body.lines().any(|l| l == line),
            "missing {line:?} in:\n{body}"
        );
    }
    // A real Prometheus scrapes the endpoint (OpenMetrics) and can query what it stored.
    let stored = prometheus_scrape(&addr, "conntrace_verdicts_total");
    assert!(
        stored.contains("refused_no_listener"),
        "Prometheus did not store the verdicts: {stored}"
    );
    ct.stop();
}

/// `GET /healthz` answered within `wait` (status, body), or `None` if nothing listens yet.
fn healthz(addr: &str, wait: Duration) -> Option<(u16, String)> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(wait))
        .build()
        .into();
    match agent.get(format!("http://{addr}/healthz")).call() {
        Ok(mut resp) => Some((
            resp.status().as_u16(),
            resp.body_mut().read_to_string().expect("healthz body"),
        )),
        Err(ureq::Error::Io(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => None,
        Err(e) => panic!("GET /healthz within {wait:?}: {e}"),
    }
}

#[test]
fn healthz_answers_not_ready_at_once_while_the_programs_load() {
    let addr = format!("127.0.0.1:{}", free_loopback_port());
    let args = ["--port", "3306", "--metrics-addr", &addr].map(str::to_owned);
    // Loading takes the best part of a second (BTF, the programs, the verifier); conntrace
    // binds the metrics address before it starts. A probe meanwhile gets 503, not a wait.
    let starting = std::thread::spawn(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        conntrace_tests::Conntrace::start(&args)
    });
    let mut first = None;
    for _ in 0..1000 {
        if let Some(answer) = healthz(&addr, Duration::from_millis(300)) {
            first = Some(answer);
            break;
        }
        assert!(
            !starting.is_finished(),
            "ready before the metrics address answered"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let ct = starting.join().expect("conntrace started");
    assert_eq!(
        first,
        Some((503, "not tracing\n".to_owned())),
        "the first answer, while loading"
    );
    assert_eq!(
        healthz(&addr, Duration::from_secs(2)),
        Some((200, "ok\n".to_owned())),
        "once ready"
    );
    ct.stop();
}

/// Runs Debian's Prometheus against `target` with a 1 s scrape interval until a query for
/// `metric` returns data (20 s at most); returns the query's JSON answer.
fn prometheus_scrape(target: &str, metric: &str) -> String {
    let dir = TempDir::new("ct-prom");
    let config = dir.join("prometheus.yml");
    let yaml = format!(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: conntrace\n    static_configs:\n      - targets: ['{target}']\n"
    );
    std::fs::write(&config, yaml).expect("write prometheus.yml");
    let web = format!("127.0.0.1:{}", free_loopback_port());
    // Declared after `dir`, so dropped before it: Prometheus is killed, then its files removed.
    let _prometheus = Proc::spawn(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        "prometheus (package `prometheus`, installed by `cargo xtask setup`)",
    );
    let url = format!("http://{web}/api/v1/query?query={metric}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut resp) = ureq::get(&url).call()
            && let Ok(text) = resp.body_mut().read_to_string()
            && text.contains("\"result\":[{")
        {
            return text;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "Prometheus stored nothing for {metric} within 20 s"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn explain_names_every_reason_and_rejects_unknown_ones() {
    let out = Command::new(conntrace_bin())
        .args(["explain", "syncookie_ack_lost"])
        .output()
        .expect("run conntrace explain");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("syncookie_ack_lost (server)"), "{text}");
    assert!(text.contains("what to do:"), "{text}");
    let out = Command::new(conntrace_bin())
        .args(["explain", "no_such_reason"])
        .output()
        .expect("run conntrace explain");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("unknown reason `no_such_reason`"), "{err}");
}

#[test]
fn man_page_and_completions_come_from_the_cli_definition() {
    let run = |args: &[&str]| {
        let out = Command::new(conntrace_bin())
            .args(args)
            .output()
            .expect("run conntrace");
        assert!(out.status.success(), "{args:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let man = run(&["man"]);
    assert!(man.contains(".TH conntrace 1"), "{man}");
    for option in ["stall\\-timeout", "metrics\\-addr", "expect\\-comm"] {
        assert!(man.contains(option), "{option} missing from the man page");
    }
    let bash = run(&["completions", "bash"]);
    assert!(
        bash.contains("_conntrace()") && bash.contains("--stall-timeout"),
        "{bash}"
    );
    let zsh = run(&["completions", "zsh"]);
    assert!(zsh.contains("#compdef conntrace"), "{zsh}");
}

#[test]
fn on_a_terminal_verdicts_are_coloured_under_a_live_status_line() {
    let Scenario { hosts, .. } = Scenario::new();
    // A port no other scenario uses: the counts below are exact, and the connections of an
    // earlier scenario's namespaces, still being torn down, may end meanwhile (one whose
    // route went with its veth is a `no_route` on 3306; seen in CI).
    const ALONE: u16 = 3316;
    // `script` gives conntrace a pseudo-terminal as stdout and copies what it shows.
    let command = format!(
        "{} --port {ALONE} --duration 6s",
        conntrace_bin().to_str().expect("utf-8 path")
    );
    let mut term = Proc::spawn(
        Command::new("script")
            .args(["-qfec", &command, "/dev/null"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null()),
        "script (bsdutils)",
    );
    // What the terminal shows, as it comes: the connection is made once conntrace is ready
    // (its --duration counts from then; loading takes a minute on an emulated kernel).
    let shown = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let reader = {
        let shown = std::sync::Arc::clone(&shown);
        let mut stdout = term.child.stdout.take().expect("script's stdout");
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut stdout, &mut buf) {
                if n == 0 {
                    break;
                }
                shown.lock().expect("shown").extend_from_slice(&buf[..n]);
            }
        })
    };
    let deadline = std::time::Instant::now() + conntrace_tests::ready_timeout();
    while !String::from_utf8_lossy(&shown.lock().expect("shown")).contains("conntrace ready") {
        assert!(
            std::time::Instant::now() < deadline,
            "conntrace never said it was ready"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    connect(&hosts.client, &hosts.server_ip, ALONE, &[]).json_lines(Duration::from_secs(10));
    term.wait(Duration::from_secs(30), "script running conntrace");
    reader.join().expect("reader");
    let shown = String::from_utf8_lossy(&shown.lock().expect("shown")).into_owned();
    assert!(
        shown.contains("\x1b[31mrefused_no_listener"),
        "no coloured verdict: {shown:?}"
    );
    assert!(
        shown.contains("\r\n[conntrace] 2 verdicts: failed 2 | refused_no_listener 2 |"),
        "no live status line: {shown:?}"
    );
    // The summary table at exit: the reason, its count, and advice naming the address.
    assert!(shown.contains("\x1b[Ksummary: 2 verdicts"), "{shown:?}");
    let row = format!(
        "refused_no_listener           2  nothing listens on {}:{ALONE}",
        hosts.server_ip
    );
    assert!(shown.contains(&row), "no summary row {row:?}: {shown:?}");
    assert!(
        shown.contains(&format!("top failing ports: {ALONE} (2)")),
        "{shown:?}"
    );
}

#[test]
fn a_conntrace_that_exits_before_ready_is_reported_at_once_not_after_the_ready_timeout() {
    // A usage error: conntrace exits at once, printing nothing on stdout. The harness says so
    // as soon as the output ends instead of waiting out its ready timeout (60 s).
    let started = std::time::Instant::now();
    let failed = std::panic::catch_unwind(|| {
        conntrace_tests::Conntrace::start(&["--port", "3306", "--no-such-flag"])
    });
    let Err(panic) = failed else {
        panic!("conntrace with an unknown flag became ready");
    };
    let message = panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_default();
    assert!(message.contains("output ended"), "{message}");
    assert!(
        message.contains("--no-such-flag"),
        "its log names the flag: {message}"
    );
    assert!(
        started.elapsed() < conntrace_tests::ready_timeout() / 2,
        "waited {:?}",
        started.elapsed()
    );
}
