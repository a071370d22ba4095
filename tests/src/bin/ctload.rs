//! Load generator for the benchmark: connection churn as fast as the machine allows.
//!
//! `ctload serve ADDR PORT [--threads N]`: accepts, writes a greeting, closes (N accept threads).
//! `ctload churn ADDR PORT --for-ms T [--parallel K] [--rate R] [--count N] [--slice-ms S]`:
//! K threads connect, read the greeting and the server's FIN, and close, again and again for
//! T ms or until N connections were made (at most R connections a second in all, when given);
//! prints one JSON line:
//! `{"connections":N,"failed":F,"ms":T,"per_second":R,"cpu_s":C,"slices":[...]}` where C is
//! the CPU time (user + system, all threads) the churn used and `slices` the rate
//! (connections a second) of each S ms slice of the churn, in order (empty without
//! `--slice-ms`).

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
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let l = Arc::clone(&listener);
            std::thread::spawn(move || {
                loop {
                    if let Ok((mut s, _)) = l.accept() {
                        s.write_all(b"hello\n").ok();
                        // Dropped: the server closes first, as a greeting server that is done.
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
    // Until the time is up or every worker stopped at the count; the connections each
    // --slice-ms slice completed, as a rate.
    let deadline = start + Duration::from_millis(for_ms);
    let slice = flag(args, "--slice-ms").map(Duration::from_millis);
    let mut slices: Vec<f64> = Vec::new();
    let (mut slice_start, mut slice_done) = (start, 0);
    while Instant::now() < deadline && workers.iter().any(|w| !w.is_finished()) {
        std::thread::sleep(
            Duration::from_millis(10).min(deadline.saturating_duration_since(Instant::now())),
        );
        if let Some(slice) = slice {
            let now = Instant::now();
            if now - slice_start >= slice {
                let done = ok.load(Ordering::Relaxed);
                slices.push((done - slice_done) as f64 / (now - slice_start).as_secs_f64());
                (slice_start, slice_done) = (now, done);
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().ok();
    }
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    let n = ok.load(Ordering::Relaxed);
    let slices: Vec<String> = slices.iter().map(|r| format!("{r:.0}")).collect();
    println!(
        "{{\"connections\":{n},\"failed\":{},\"ms\":{ms:.1},\"per_second\":{:.1},\"cpu_s\":{:.4},\"slices\":[{}]}}",
        failed.load(Ordering::Relaxed),
        n as f64 / (ms / 1000.0),
        cpu_seconds(),
        slices.join(",")
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
    let usage = "usage: ctload serve|churn ADDR PORT [options]";
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
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    }
}
