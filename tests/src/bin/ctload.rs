//! Load generator for the benchmark: connection churn as fast as the machine allows.
//!
//! `ctload serve ADDR PORT [--threads N] [--echo]`: accepts, writes a greeting, closes (N accept
//! threads); with `--echo`, a thread per connection then sends back what it reads until EOF.
//! `ctload churn ADDR PORT --for-ms T [--parallel K] [--rate R] [--count N] [--slice-ms S]`:
//! K threads connect, read the greeting and the server's FIN, and close, again and again for
//! T ms or until N connections were made (at most R connections a second in all, when given);
//! prints one JSON line:
//! `{"connections":N,"failed":F,"ms":T,"per_second":R,"cpu_s":C,"slices":[...]}` where C is
//! the CPU time (user + system, all threads) the churn used and `slices` the rate
//! (connections a second) of each S ms slice of the churn, in order (empty without
//! `--slice-ms`).
//! `ctload pingpong ADDR PORT --for-ms T [--parallel K] [--size B] [--slice-ms S]`: K threads
//! each connect once (to a `--echo` server), read the greeting, then write B bytes (64) and
//! read them back, again and again for T ms, as a pooled database client's queries; prints
//! `{"requests":N,"failed":F,"ms":T,"per_second":R,"cpu_s":C,"slices":[...]}` (requests).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

fn flag(args: &[String], name: &str) -> Option<u64> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
}

fn serve(addr: SocketAddr, args: &[String]) {
    let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    // SAFETY: listen(2) on our own socket, raising the backlog for the churn.
    unsafe { libc::listen(std::os::fd::AsRawFd::as_raw_fd(&listener), 4096) };
    let listener = Arc::new(listener);
    println!("listening");
    std::io::stdout().flush().ok();
    let threads = flag(args, "--threads").unwrap_or(2);
    let echo = args.iter().any(|a| a == "--echo");
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let l = Arc::clone(&listener);
            std::thread::spawn(move || {
                loop {
                    if let Ok((mut s, _)) = l.accept() {
                        s.write_all(b"hello\n").ok();
                        if echo {
                            std::thread::spawn(move || echo_until_eof(s));
                        }
                        // Else dropped: the server closes first, as a greeting server that
                        // is done.
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().ok();
    }
}

fn churn(addr: SocketAddr, args: &[String]) {
    let for_ms = flag(args, "--for-ms").unwrap_or(3000);
    let parallel = flag(args, "--parallel").unwrap_or(2).max(1);
    // Each thread's pause between connections for the requested total rate.
    let pause = flag(args, "--rate")
        .filter(|r| *r > 0)
        .map(|r| Duration::from_secs_f64(parallel as f64 / r as f64));
    let count = flag(args, "--count").unwrap_or(u64::MAX);
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    // Connections started, so that --count is never exceeded.
    let started = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let workers: Vec<_> = (0..parallel)
        .map(|_| {
            let (ok, failed, stop) = (Arc::clone(&ok), Arc::clone(&failed), Arc::clone(&stop));
            let started = Arc::clone(&started);
            std::thread::spawn(move || {
                let mut buf = [0u8; 16];
                while !stop.load(Ordering::Relaxed)
                    && started.fetch_add(1, Ordering::Relaxed) < count
                {
                    let done = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                        .and_then(|mut s| greeting_then_eof(&mut s, &mut buf));
                    match done {
                        Ok(n) if n > 0 => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                    if let Some(p) = pause {
                        std::thread::sleep(p);
                    }
                }
            })
        })
        .collect();
    // Until the time is up or every worker stopped at the count.
    finish(
        "connections",
        args,
        (start, for_ms),
        workers,
        (&ok, &failed, &stop),
    );
}

/// Sends back what `s` reads until its peer closes.
fn echo_until_eof(mut s: TcpStream) {
    s.set_nodelay(true).ok();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 || s.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

/// Rates (a second) of each `slice` of a run that counts `done` until `deadline` or until
/// every worker finished.
fn sample_slices(
    done: &AtomicU64,
    workers: &[std::thread::JoinHandle<()>],
    (start, deadline): (Instant, Instant),
    slice: Option<Duration>,
) -> Vec<f64> {
    let mut slices: Vec<f64> = Vec::new();
    let (mut slice_start, mut slice_done) = (start, 0);
    while Instant::now() < deadline && workers.iter().any(|w| !w.is_finished()) {
        std::thread::sleep(
            Duration::from_millis(10).min(deadline.saturating_duration_since(Instant::now())),
        );
        if let Some(slice) = slice {
            let now = Instant::now();
            if now - slice_start >= slice {
                let n = done.load(Ordering::Relaxed);
                slices.push((n - slice_done) as f64 / (now - slice_start).as_secs_f64());
                (slice_start, slice_done) = (now, n);
            }
        }
    }
    slices
}

/// Waits for the run's end (`for_ms` after `start`, or every worker done), sampling each
/// `--slice-ms` slice's rate, stops and joins the workers, and prints the JSON line.
fn finish(
    unit: &str,
    args: &[String],
    (start, for_ms): (Instant, u64),
    workers: Vec<std::thread::JoinHandle<()>>,
    (ok, failed, stop): (&AtomicU64, &AtomicU64, &AtomicBool),
) {
    let deadline = start + Duration::from_millis(for_ms);
    let slice = flag(args, "--slice-ms").map(Duration::from_millis);
    let slices = sample_slices(ok, &workers, (start, deadline), slice);
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().ok();
    }
    let done = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    report(unit, done, start, &slices);
}

/// Prints a run's JSON line: `unit` done and failed, its rate, the CPU it used, its slices.
fn report(unit: &str, (done, failed): (u64, u64), start: Instant, slices: &[f64]) {
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    let slices: Vec<String> = slices.iter().map(|r| format!("{r:.0}")).collect();
    println!(
        "{{\"{unit}\":{done},\"failed\":{failed},\"ms\":{ms:.1},\"per_second\":{:.1},\"cpu_s\":{:.4},\"slices\":[{}]}}",
        done as f64 / (ms / 1000.0),
        cpu_seconds(),
        slices.join(",")
    );
}

/// `parallel` connections, each writing `size` bytes and reading them back until `stop`.
fn pingpong(addr: SocketAddr, args: &[String]) {
    let for_ms = flag(args, "--for-ms").unwrap_or(3000);
    let parallel = flag(args, "--parallel").unwrap_or(1).max(1);
    let size = flag(args, "--size").unwrap_or(64).clamp(1, 4096) as usize;
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let workers: Vec<_> = (0..parallel)
        .map(|_| {
            let (ok, failed, stop) = (Arc::clone(&ok), Arc::clone(&failed), Arc::clone(&stop));
            std::thread::spawn(move || {
                let (request, mut reply) = (vec![b'q'; size], vec![0u8; size]);
                let mut greeting = [0u8; 6];
                let connected = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                    .and_then(|mut s| s.read_exact(&mut greeting).map(|()| s));
                let Ok(mut s) = connected else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                s.set_nodelay(true).ok();
                while !stop.load(Ordering::Relaxed) {
                    if s.write_all(&request)
                        .and_then(|()| s.read_exact(&mut reply))
                        .is_err()
                    {
                        failed.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    ok.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    finish(
        "requests",
        args,
        (start, for_ms),
        workers,
        (&ok, &failed, &stop),
    );
}

/// Reads the greeting (its length), then up to the server's FIN, so that the client closes
/// second: in CLOSE_WAIT, never racing the FIN into a simultaneous close. Such a race left a
/// varying share of client ports in TIME_WAIT (a few percent, more or fewer with the timing a
/// tracer changes), and connect() then walked ever longer runs of them for a free port: phases
/// of the same mode differed by half their rate.
fn greeting_then_eof(s: &mut TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let n = s.read(buf)?;
    // Bounded: a well-behaved server sends its FIN right after the greeting.
    for _ in 0..64 {
        if s.read(buf)? == 0 {
            return Ok(n);
        }
    }
    Ok(n)
}

/// CPU time (user + system) of this process and its joined threads.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct we pass; RUSAGE_SELF covers every thread.
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: ctload serve|churn|pingpong ADDR PORT [options]";
    let (Some(mode), Some(addr), Some(port)) = (args.get(1), args.get(2), args.get(3)) else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let addr = SocketAddr::new(
        addr.parse()
            .unwrap_or_else(|e| panic!("address {addr}: {e}")),
        port.parse().unwrap_or_else(|e| panic!("port {port}: {e}")),
    );
    match mode.as_str() {
        "serve" => serve(addr, &args[4..]),
        "churn" => churn(addr, &args[4..]),
        "pingpong" => pingpong(addr, &args[4..]),
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    }
}
