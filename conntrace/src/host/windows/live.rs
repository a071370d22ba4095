//! Real zero windows, as root, in network namespaces the tests create (`ip netns add`, deleted
//! by a guard also on panic; loopback only). A server greets and never reads, its client
//! pushes 32 MB (notes on issue 13, section 7). Every blocking call has a timeout; without
//! root the tests print "SKIP: needs root" and pass.

use std::{
    fs,
    io::{self, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::fs::MetadataExt as _,
    path::PathBuf,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use nix::sched::{CloneFlags, setns};

use super::{
    WindowWatch,
    diag::NsDiag,
    filter::port_filter,
    tcp_info::{Sample, TcpInfo},
};
use crate::{
    engine::facts::{FourTuple, KernelEvent, Window},
    output::Clock,
};

/// Socket reads, writes and connects give up after this.
const IO_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the watch may take to report a change.
const WAIT: Duration = Duration::from_secs(10);

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    Err(io::Error::other(format!("ip {}: {stderr}", args.join(" "))))
}

/// A network namespace of this test, deleted on drop.
struct Netns {
    name: String,
    path: PathBuf,
    inode: u32,
}

impl Netns {
    /// `ip netns add ctwin-TAG-PID`, loopback up with an Ethernet MTU (1448-byte segments, as
    /// on a real link).
    fn add(tag: &str) -> io::Result<Self> {
        let name = format!("ctwin-{tag}-{}", std::process::id());
        ip(&["netns", "add", &name])?;
        let mut ns = Self {
            path: PathBuf::from(format!("/run/netns/{name}")),
            name,
            inode: 0,
        };
        ip(&["-n", &ns.name, "link", "set", "lo", "mtu", "1500", "up"])?;
        ns.inode = u32::try_from(fs::metadata(&ns.path)?.ino()).map_err(io::Error::other)?;
        Ok(ns)
    }

    /// Runs `f` in a thread inside the namespace: the sockets it makes belong to it.
    fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let ns = fs::File::open(&self.path)?;
        thread::spawn(move || {
            setns(&ns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            f()
        })
        .join()
        .map_err(|_| io::Error::other("the thread in the namespace panicked"))?
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("cleanup: {e}");
        }
    }
}

/// Accepts one connection that is already established (non-blocking, retried for a while).
fn accept(listener: &TcpListener) -> io::Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let start = Instant::now();
    loop {
        match listener.accept() {
            Ok((s, _)) => return Ok(s),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && start.elapsed() < IO_TIMEOUT => {
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// `n` connections to `listener` from inside `ns`: (client, server) pairs, with timeouts.
fn connect(
    ns: &Netns,
    listener: &TcpListener,
    n: usize,
) -> io::Result<Vec<(TcpStream, TcpStream)>> {
    let addr = listener.local_addr()?;
    let mut pairs = Vec::with_capacity(n);
    // In batches, accepted in between: the accept queue never fills.
    for batch in (0..n).collect::<Vec<_>>().chunks(50) {
        let len = batch.len();
        let clients = ns.run(move || {
            (0..len)
                .map(|_| TcpStream::connect_timeout(&addr, IO_TIMEOUT))
                .collect::<io::Result<Vec<_>>>()
        })?;
        for client in clients {
            let server = accept(listener)?;
            for s in [&client, &server] {
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                s.set_write_timeout(Some(IO_TIMEOUT))?;
            }
            pairs.push((client, server));
        }
    }
    Ok(pairs)
}

/// Writes up to 32 MB until the buffers are full (a write times out); the bytes written.
fn push(s: &mut TcpStream) -> usize {
    let chunk = vec![b'y'; 64 << 10];
    let mut total = 0;
    while total < 32 << 20 {
        match s.write(&chunk) {
            Ok(n) => total += n,
            Err(_) => break,
        }
    }
    total
}

fn tuple(s: &TcpStream) -> FourTuple {
    let (l, p): (SocketAddr, SocketAddr) = (s.local_addr().unwrap(), s.peer_addr().unwrap());
    FourTuple {
        saddr: l.ip(),
        sport: l.port(),
        daddr: p.ip(),
        dport: p.port(),
    }
}

/// Polls `watch` every 200 ms until `done` holds for the window events so far (all from
/// namespace `netns`), or [`WAIT`] passes; those events.
fn poll_until(
    watch: &mut WindowWatch,
    netns: u32,
    done: impl Fn(&[(FourTuple, Window)]) -> bool,
) -> Vec<(FourTuple, Window)> {
    let start = Instant::now();
    let mut seen = Vec::new();
    while start.elapsed() < WAIT {
        for ev in watch.poll(Clock::mono_now_ns()) {
            let KernelEvent::Window {
                meta,
                tuple,
                window,
            } = ev
            else {
                panic!("not a window event: {ev:?}");
            };
            assert_eq!((meta.netns, meta.proc.pid), (Some(netns), 0));
            seen.push((tuple, window));
        }
        if done(&seen) {
            break;
        }
        thread::sleep(Duration::from_millis(200));
    }
    seen
}

fn has(seen: &[(FourTuple, Window)], t: FourTuple, want: fn(&Window) -> bool) -> bool {
    seen.iter().any(|(s, w)| *s == t && want(w))
}

/// The samples of namespace `ns` on `port`, and what they say with the fields of a kernel
/// before 5.4 (no `tcpi_snd_wnd`, no `tcpi_rcv_wnd`: persist timer, probes, SK_MEMINFO).
fn samples(ns: &Netns, port: u16) -> Vec<(FourTuple, Sample, Option<Window>)> {
    let mut diag = NsDiag::open(&ns.path, ns.inode).unwrap();
    let (mut buf, mut out) = (Vec::new(), Vec::new());
    diag.dump(&port_filter(&[port]), &[port], true, &mut buf, &mut out)
        .unwrap();
    let old = |s: &Sample| Sample {
        info: TcpInfo {
            snd_wnd: None,
            rcv_wnd: None,
            ..s.info
        },
        ..*s
    };
    out.into_iter()
        .map(|(t, s)| (t, s, old(&s).closed()))
        .collect()
}

#[test]
fn both_ends_of_a_zero_window_then_open_after_read_and_after_close() {
    if !is_root() {
        eprintln!("SKIP: needs root");
        return;
    }
    let ns = Netns::add("zw").unwrap();
    let listener = ns.run(|| TcpListener::bind("127.0.0.1:0")).unwrap();
    let port = listener.local_addr().unwrap().port();
    let (mut client, mut server) = connect(&ns, &listener, 1).unwrap().remove(0);
    server.write_all(b"hello\n").unwrap();
    client.read_exact(&mut [0; 6]).unwrap();
    let sent = push(&mut client);
    assert!(
        sent < 32 << 20,
        "the server never reads: the client cannot send it all"
    );
    let (ct, st) = (tuple(&client), tuple(&server));
    let mut watch = WindowWatch::new(&[port]);
    watch.traced_in(Some(ns.inode));
    let both_zero = |s: &[_]| {
        has(
            s,
            ct,
            |w| matches!(w, Window::PeerZero { queued } if *queued > 0),
        ) && has(
            s,
            st,
            |w| matches!(w, Window::LocalFull { queued } if *queued > 0),
        )
    };
    let seen = poll_until(&mut watch, ns.inode, both_zero);
    assert!(both_zero(&seen) && seen.len() == 2, "{seen:?}");
    eprintln!("zero: {seen:?}");
    // The fields older kernels have say the same of these sockets.
    for (t, s, old) in samples(&ns, port) {
        eprintln!("{t:?}: {s:?}; without snd_wnd/rcv_wnd: {old:?}");
        assert_eq!(old, s.closed(), "{t:?}");
    }
    // The server reads it all: both open.
    let mut data = vec![0; sent];
    server.read_exact(&mut data).unwrap();
    let both_open =
        |s: &[_]| has(s, ct, |w| *w == Window::Open) && has(s, st, |w| *w == Window::Open);
    let seen = poll_until(&mut watch, ns.inode, both_open);
    assert!(both_open(&seen) && seen.len() == 2, "{seen:?}");
    // Stalled again, then the server closes with data unread (a reset): both gone, open.
    assert!(push(&mut client) < 32 << 20);
    let seen = poll_until(&mut watch, ns.inode, both_zero);
    assert!(both_zero(&seen) && seen.len() == 2, "{seen:?}");
    drop(server);
    let seen = poll_until(&mut watch, ns.inode, both_open);
    assert!(both_open(&seen) && seen.len() == 2, "{seen:?}");
    assert!(samples(&ns, port).is_empty(), "both sockets gone");
    // No traced connection left: the namespace is no longer read, its socket closed.
    assert!(!watch.sockets.contains_key(&ns.inode));
    assert!(matches!(&watch.scope, super::Scope::Seen(s) if s.is_empty()));
    assert!(watch.poll(Clock::mono_now_ns()).is_empty());
}

/// This thread's CPU time so far: (total from CLOCK_THREAD_CPUTIME_ID, then user and system
/// from getrusage, whose split may be sampled at timer ticks).
fn thread_cpu() -> (Duration, Duration, Duration) {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid pointer to a timespec.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
    assert_eq!(rc, 0);
    // SAFETY: an all-zero rusage is valid; getrusage fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a rusage.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &raw mut ru) };
    assert_eq!(rc, 0);
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    let total = Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32);
    (total, tv(ru.ru_utime), tv(ru.ru_stime))
}

#[test]
fn poll_cost_with_a_thousand_connections() {
    if !is_root() {
        eprintln!("SKIP: needs root");
        return;
    }
    let ns = Netns::add("cost").unwrap();
    let listener = ns.run(|| TcpListener::bind("127.0.0.1:0")).unwrap();
    let port = listener.local_addr().unwrap().port();
    let pairs = connect(&ns, &listener, 500).unwrap();
    assert_eq!(samples(&ns, port).len(), 1000, "both ends of each");
    // Port 1: not ephemeral, so no socket here has it (a neighbour of `port` may be a client's).
    assert!(samples(&ns, 1).is_empty(), "filtered in the kernel");
    for (label, ports) in [
        ("traced port (1000 match)", vec![port]),
        ("other port (none match)", vec![1]),
        ("all ports (no filter)", vec![]),
    ] {
        let mut watch = WindowWatch::new(&ports);
        watch.traced_in(Some(ns.inode));
        let first = Instant::now();
        assert!(watch.poll(Clock::mono_now_ns()).is_empty());
        let first = first.elapsed();
        const N: u32 = 20;
        let cpu_before = thread_cpu();
        let mut times: Vec<Duration> = (0..N)
            .map(|_| {
                // As if events kept naming it: a namespace whose dump finds nothing would be
                // forgotten, and the next polls would cost nothing.
                watch.traced_in(Some(ns.inode));
                let t = Instant::now();
                assert!(watch.poll(Clock::mono_now_ns()).is_empty());
                t.elapsed()
            })
            .collect();
        let cpu = thread_cpu();
        times.sort();
        eprintln!(
            "poll, {label}: first {first:?} (opens the socket); then wall median {:?}, max {:?}; \
             CPU per poll {:?} (user {:?}, system {:?})",
            times[times.len() / 2],
            times[times.len() - 1],
            (cpu.0 - cpu_before.0) / N,
            (cpu.1 - cpu_before.1) / N,
            (cpu.2 - cpu_before.2) / N,
        );
    }
    drop(pairs);
}
