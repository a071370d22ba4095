//! Test peer: a small TCP server or client run inside a test namespace.
//!
//! `ctpeer serve ADDR PORT [--accept N] [--greeting TEXT] [--greeting-delay-ms T] [--greeting-on-usr1]
//!                         [--linger0] [--backlog N]
//!                         [--hold-ms T] [--respond BYTES] [--close-delay-ms T] [--report]
//!                         [--reuseport] [--v6only] [--comm NAME] [--accept-delay-ms T]`
//!   prints `listening` when ready, accepts N connections (default: until killed; 0: never
//!   accepts, holding the listener until killed; the first only T ms after `listening` with
//!   `--accept-delay-ms`, its accept queue filling meanwhile), sends the greeting (after T ms, in a thread
//!   per connection, when `--greeting-delay-ms` is given, or once SIGUSR1 came with
//!   `--greeting-on-usr1`, and those are waited for before
//!   exiting after N), then either aborts with
//!   SO_LINGER 0 (`--linger0`) or waits for the peer to close. `--reuseport` sets
//!   SO_REUSEADDR and SO_REUSEPORT before bind(), so several servers share the port (each
//!   socket with its own accept queue); `--v6only` sets IPV6_V6ONLY (an IPv6 listener that
//!   takes no IPv4 connection); `--comm` renames the process (default `ct-server`).
//!   With `--hold-ms`, `--respond`, `--close-delay-ms` or `--report`, each connection has its own thread: the
//!   greeting, then no read at all for T ms (`--hold-ms`: the receive queue fills and the window
//!   closes), then a request read and answered with BYTES bytes (`--respond`), then reads until
//!   the peer closes (30 s at most), then waits T ms before closing (`--close-delay-ms`: the
//!   ACK of the peer's FIN goes out alone, before this end's FIN); `--report` prints one JSON
//!   line when a connection ends:
//!   `{"peer":"10.77.1.1:40000","sent":15,"received":0,"errno":110}`.
//! `ctpeer connect ADDR PORT [--count N] [--timeout-ms T] [--sport P] [--bind ADDR] [--blocking]
//!                           [--parallel K] [--read | --read-until-close] [--request TEXT]
//!                           [--request-delay-ms T] [--expect-bytes N] [--send-bytes N]`
//!   makes N connections (K at a time) and prints one JSON line per attempt:
//!   `{"ok":true,"local":"10.77.1.1:40000","errno":null,"ms":0.3,"stage":null,"sent":0,"received":6,"error_at_unix_ms":...}`.
//!   The connect is a non-blocking one polled for T ms, unless `--blocking`, `--sport` or
//!   `--bind` (binding the local address first) ask for a blocking connect(2) (SO_SNDTIMEO T).
//!   Once connected: the greeting is read (`--read`), TEXT sent (`--request`, T ms later with
//!   `--request-delay-ms`), N bytes read
//!   (`--expect-bytes`), N bytes sent (`--send-bytes`, each send() waiting T ms at most), in
//!   that order; `stage` names the step that failed (`connect`, `read`, `send`).
//! Both rename their process (`ct-server`, `ct-client`) so verdicts can be checked by comm.

use std::{
    io::{Read, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

fn set_comm(name: &str) {
    let mut buf = [0u8; 16];
    buf[..name.len().min(15)].copy_from_slice(&name.as_bytes()[..name.len().min(15)]);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, buf.as_ptr()) };
}

fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn has(args: &[String], name: &str) -> bool {
    args.iter().any(|a| a == name)
}

/// A listener on `addr` with options set before bind(), backlog 128: SO_REUSEADDR and
/// SO_REUSEPORT (`reuseport`), IPV6_V6ONLY (`v6only`, an IPv6 address only).
fn bind_with(addr: SocketAddr, reuseport: bool, v6only: bool) -> std::io::Result<TcpListener> {
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    let check = |rc: i32| {
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    // SAFETY: plain socket/setsockopt/bind/listen syscalls on a socket this function owns
    // (wrapped at once, so it is closed on every error path).
    unsafe {
        let fd = libc::socket(domain, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let listener = <TcpListener as std::os::fd::FromRawFd>::from_raw_fd(fd);
        let one: libc::c_int = 1;
        let reuse = [
            (libc::SOL_SOCKET, libc::SO_REUSEADDR),
            (libc::SOL_SOCKET, libc::SO_REUSEPORT),
        ];
        let options = reuse
            .iter()
            .filter(|_| reuseport)
            .chain(v6only.then_some(&(libc::IPPROTO_IPV6, libc::IPV6_V6ONLY)));
        for &(level, opt) in options {
            check(libc::setsockopt(
                fd,
                level,
                opt,
                (&one as *const i32).cast(),
                4,
            ))?;
        }
        let (sa, len) = sockaddr(addr);
        check(libc::bind(
            fd,
            (&sa as *const libc::sockaddr_storage).cast(),
            len,
        ))?;
        check(libc::listen(fd, 128))?;
        Ok(listener)
    }
}

/// Set by SIGUSR1 (`--greeting-on-usr1`).
static GOT_USR1: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_usr1(_: libc::c_int) {
    GOT_USR1.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Installs the SIGUSR1 handler (before "listening" is printed, so a test's signal finds it).
fn catch_usr1() {
    let handler: extern "C" fn(libc::c_int) = on_usr1;
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe { libc::signal(libc::SIGUSR1, handler as libc::sighandler_t) };
}

/// Waits until SIGUSR1 came, `limit` at most.
fn wait_for_usr1(limit: Duration) {
    let start = Instant::now();
    while !GOT_USR1.load(std::sync::atomic::Ordering::SeqCst) && start.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn serve(addr: SocketAddr, args: &[String]) {
    set_comm(flag(args, "--comm").as_deref().unwrap_or("ct-server"));
    let (reuseport, v6only) = (has(args, "--reuseport"), has(args, "--v6only"));
    let listener = if reuseport || v6only {
        bind_with(addr, reuseport, v6only)
    } else {
        TcpListener::bind(addr)
    }
    .unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    if let Some(backlog) = flag(args, "--backlog").and_then(|b| b.parse::<i32>().ok()) {
        // SAFETY: listen(2) on our own socket.
        unsafe { libc::listen(listener.as_raw_fd(), backlog) };
    }
    let limit: usize = flag(args, "--accept")
        .and_then(|n| n.parse().ok())
        .unwrap_or(usize::MAX);
    let greeting = flag(args, "--greeting").unwrap_or_default();
    let delay = flag(args, "--greeting-delay-ms")
        .and_then(|n| n.parse().ok())
        .map(Duration::from_millis);
    // `--greeting-on-usr1`: the greeting waits for SIGUSR1 (a test's trigger once its
    // conntrace is ready, however long that took), 60 s at most, after any delay.
    let on_usr1 = has(args, "--greeting-on-usr1");
    if on_usr1 {
        catch_usr1();
    }
    let delay = delay.or(on_usr1.then_some(Duration::ZERO));
    let linger0 = has(args, "--linger0");
    let conversation = Conversation::from_args(args, &greeting);
    println!("listening");
    std::io::stdout().flush().ok();
    if limit == 0 {
        // A server that never calls accept(): its queue fills up.
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    if let Some(ms) = flag(args, "--accept-delay-ms").and_then(|n| n.parse().ok()) {
        std::thread::sleep(Duration::from_millis(ms));
    }
    // Delayed greetings still to go when the last connection is accepted.
    let mut delayed = Vec::new();
    for _ in 0..limit {
        let Ok((mut s, _)) = listener.accept() else {
            continue;
        };
        if conversation.own_thread() {
            let conversation = conversation.clone();
            std::thread::spawn(move || conversation.run(s));
            continue;
        }
        if let Some(delay) = delay {
            let greeting = greeting.clone();
            delayed.push(std::thread::spawn(move || {
                std::thread::sleep(delay);
                if on_usr1 {
                    wait_for_usr1(Duration::from_secs(60));
                }
                s.write_all(greeting.as_bytes()).ok();
                if linger0 {
                    abort(s);
                    return;
                }
                s.set_read_timeout(Some(Duration::from_secs(10))).ok();
                let mut buf = [0u8; 64];
                while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
            }));
            continue;
        }
        if !greeting.is_empty() {
            s.write_all(greeting.as_bytes()).ok();
        }
        if linger0 {
            abort(s);
        } else {
            std::thread::spawn(move || {
                s.set_read_timeout(Some(Duration::from_secs(10))).ok();
                let mut buf = [0u8; 64];
                while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    }
    for greeting in delayed {
        greeting.join().ok();
    }
}

/// Closes `s` with SO_LINGER 0: the kernel sends a RST instead of a FIN.
fn abort(s: TcpStream) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt with a valid linger struct on our own socket.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            size_of::<libc::linger>() as u32,
        )
    };
    std::thread::sleep(Duration::from_millis(50));
    drop(s);
}

/// What a `serve` thread does with one connection (`--hold-ms`, `--respond`, `--report`).
#[derive(Clone)]
struct Conversation {
    greeting: String,
    hold: Option<Duration>,
    respond: Option<usize>,
    close_delay: Option<Duration>,
    report: bool,
}

impl Conversation {
    fn from_args(args: &[String], greeting: &str) -> Self {
        Self {
            greeting: greeting.to_owned(),
            hold: flag(args, "--hold-ms")
                .and_then(|n| n.parse().ok())
                .map(Duration::from_millis),
            respond: flag(args, "--respond").and_then(|n| n.parse().ok()),
            close_delay: flag(args, "--close-delay-ms")
                .and_then(|n| n.parse().ok())
                .map(Duration::from_millis),
            report: has(args, "--report"),
        }
    }

    /// Whether connections get this conversation (a thread each) instead of the plain one.
    fn own_thread(&self) -> bool {
        self.hold.is_some() || self.respond.is_some() || self.close_delay.is_some() || self.report
    }

    fn run(self, mut s: TcpStream) {
        let peer = s.peer_addr().map(|a| a.to_string()).ok();
        let (mut sent, mut received) = (0usize, 0usize);
        let result = (|| -> std::io::Result<()> {
            if !self.greeting.is_empty() {
                s.write_all(self.greeting.as_bytes())?;
                sent += self.greeting.len();
            }
            if let Some(hold) = self.hold {
                // Not reading: the receive queue fills and the advertised window closes.
                std::thread::sleep(hold);
            }
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            let mut buf = vec![0u8; 65536];
            if let Some(bytes) = self.respond {
                received += s.read(&mut buf)?;
                s.write_all(&vec![b'x'; bytes])?;
                sent += bytes;
            }
            loop {
                match s.read(&mut buf)? {
                    0 => return Ok(()),
                    n => received += n,
                }
            }
        })();
        if let (Ok(()), Some(delay)) = (&result, self.close_delay) {
            std::thread::sleep(delay);
        }
        if self.report {
            let line = serde_json::json!({
                "peer": peer,
                "sent": sent,
                "received": received,
                "errno": result.err().and_then(|e| e.raw_os_error()),
            });
            let mut out = std::io::stdout().lock();
            writeln!(out, "{line}").ok();
            out.flush().ok();
        }
    }
}

/// How `connect` makes and uses each connection.
#[derive(Clone)]
struct Plan {
    timeout: Duration,
    bind: Option<IpAddr>,
    blocking: bool,
    read: bool,
    until_close: bool,
    request: Option<String>,
    /// How long to wait before sending the request.
    request_delay: Duration,
    expect_bytes: usize,
    send_bytes: usize,
}

/// A connection's failure: the step (`connect`, `read`, `send`) and the error.
type Failure = (&'static str, std::io::Error);

/// Connects: polled non-blocking by default, a blocking connect(2) when asked or when the
/// local end is bound first (so the test knows the 4-tuple even when connect fails).
fn open(addr: SocketAddr, plan: &Plan, sport: Option<u16>) -> std::io::Result<TcpStream> {
    if sport.is_none() && plan.bind.is_none() && !plan.blocking {
        return TcpStream::connect_timeout(&addr, plan.timeout);
    }
    let unspecified = match addr.ip() {
        IpAddr::V4(_) => IpAddr::from([0u8; 4]),
        IpAddr::V6(_) => IpAddr::from([0u16; 8]),
    };
    let local = SocketAddr::new(plan.bind.unwrap_or(unspecified), sport.unwrap_or(0));
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket/bind/connect syscalls on a socket this function owns.
    unsafe {
        let fd = libc::socket(domain, libc::SOCK_STREAM, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let s = <TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd);
        if sport.is_some() || plan.bind.is_some() {
            let one: libc::c_int = 1;
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_REUSEADDR,
                (&one as *const i32).cast(),
                4,
            );
            let (sa, len) = sockaddr(local);
            if libc::bind(fd, (&sa as *const libc::sockaddr_storage).cast(), len) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        s.set_write_timeout(Some(plan.timeout))?;
        let (sa, len) = sockaddr(addr);
        if libc::connect(fd, (&sa as *const libc::sockaddr_storage).cast(), len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(s)
    }
}

/// The steps after connecting, counting the bytes sent and received.
fn exchange(
    stream: &TcpStream,
    plan: &Plan,
    sent: &mut usize,
    received: &mut usize,
) -> Result<(), Failure> {
    let mut s = stream;
    let reading = |e| ("read", e);
    stream
        .set_read_timeout(Some(plan.timeout))
        .map_err(reading)?;
    stream
        .set_write_timeout(Some(plan.timeout))
        .map_err(|e| ("send", e))?;
    let mut buf = vec![0u8; 65536];
    if plan.read {
        let n = s.read(&mut buf[..64]).map_err(reading)?;
        *received += n;
        if n > 0 && plan.until_close {
            // Read again until the server closes: an abort makes this fail with ECONNRESET.
            loop {
                match s.read(&mut buf[..64]).map_err(reading)? {
                    0 => break,
                    n => *received += n,
                }
            }
        }
    }
    if let Some(request) = &plan.request {
        std::thread::sleep(plan.request_delay);
        s.write_all(request.as_bytes()).map_err(|e| ("send", e))?;
        *sent += request.len();
    }
    let mut goal = *received + plan.expect_bytes;
    while *received < goal {
        match s.read(&mut buf).map_err(reading)? {
            0 => return Err(("read", std::io::ErrorKind::UnexpectedEof.into())),
            n => *received += n,
        }
    }
    goal = *sent + plan.send_bytes;
    let chunk = vec![b'y'; 65536];
    while *sent < goal {
        let n = (goal - *sent).min(chunk.len());
        *sent += s.write(&chunk[..n]).map_err(|e| ("send", e))?;
    }
    Ok(())
}

fn connect_once(addr: SocketAddr, plan: &Plan, sport: Option<u16>) -> serde_json::Value {
    let start = Instant::now();
    let (mut sent, mut received) = (0, 0);
    let result = open(addr, plan, sport)
        .map_err(|e| ("connect", e))
        .and_then(|s| exchange(&s, plan, &mut sent, &mut received).map(|()| s));
    let ms = start.elapsed().as_secs_f64() * 1000.0;
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    match result {
        Ok(s) => serde_json::json!({
            "ok": true,
            "local": s.local_addr().map(|a| a.to_string()).ok(),
            "errno": null,
            "ms": ms,
            "stage": null,
            "sent": sent,
            "received": received,
        }),
        Err((stage, e)) => serde_json::json!({
            "ok": false,
            "local": sport.map(|p| p.to_string()),
            "errno": e.raw_os_error(),
            "ms": ms,
            "stage": stage,
            "sent": sent,
            "received": received,
            "error_at_unix_ms": now_ms,
        }),
    }
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, u32) {
    // SAFETY: sockaddr_storage is plain data; zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin) };
            (storage, size_of::<libc::sockaddr_in>() as u32)
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as u16,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write((&mut storage as *mut libc::sockaddr_storage).cast(), sin6) };
            (storage, size_of::<libc::sockaddr_in6>() as u32)
        }
    }
}

fn connect(addr: SocketAddr, args: &[String]) {
    set_comm("ct-client");
    let count: usize = flag(args, "--count")
        .and_then(|n| n.parse().ok())
        .unwrap_or(1);
    let parallel: usize = flag(args, "--parallel")
        .and_then(|n| n.parse().ok())
        .unwrap_or(1)
        .max(1);
    let timeout = Duration::from_millis(
        flag(args, "--timeout-ms")
            .and_then(|n| n.parse().ok())
            .unwrap_or(5000),
    );
    let sport: Option<u16> = flag(args, "--sport").and_then(|n| n.parse().ok());
    let until_close = has(args, "--read-until-close");
    let bytes = |name| flag(args, name).and_then(|n| n.parse().ok()).unwrap_or(0);
    let plan = Arc::new(Plan {
        timeout,
        bind: flag(args, "--bind").map(|a| a.parse().unwrap_or_else(|e| panic!("--bind {a}: {e}"))),
        blocking: has(args, "--blocking"),
        read: has(args, "--read") || until_close,
        until_close,
        request: flag(args, "--request"),
        request_delay: Duration::from_millis(bytes("--request-delay-ms") as u64),
        expect_bytes: bytes("--expect-bytes"),
        send_bytes: bytes("--send-bytes"),
    });
    let next = Arc::new(Mutex::new(0usize));
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let workers: Vec<_> = (0..parallel)
        .map(|_| {
            let (next, out, plan) = (Arc::clone(&next), Arc::clone(&out), Arc::clone(&plan));
            std::thread::spawn(move || {
                loop {
                    let i = {
                        let mut n = next.lock().expect("counter");
                        if *n >= count {
                            break;
                        }
                        *n += 1;
                        *n
                    };
                    let line = connect_once(addr, &plan, sport.map(|p| p + i as u16 - 1));
                    let mut o = out.lock().expect("stdout");
                    writeln!(o, "{line}").ok();
                    o.flush().ok();
                }
            })
        })
        .collect();
    for w in workers {
        w.join().ok();
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: ctpeer serve|connect ADDR PORT [options]";
    let (Some(mode), Some(ip), Some(port)) = (args.get(1), args.get(2), args.get(3)) else {
        eprintln!("{usage}");
        std::process::exit(2);
    };
    let ip: IpAddr = ip.parse().unwrap_or_else(|e| panic!("address {ip}: {e}"));
    let port: u16 = port.parse().unwrap_or_else(|e| panic!("port {port}: {e}"));
    let addr = SocketAddr::new(ip, port);
    match mode.as_str() {
        "serve" => serve(addr, &args[4..]),
        "connect" => connect(addr, &args[4..]),
        _ => {
            eprintln!("{usage}");
            std::process::exit(2);
        }
    }
}
