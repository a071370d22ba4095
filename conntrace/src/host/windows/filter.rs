//! The inet_diag filter program (`INET_DIAG_REQ_BYTECODE`) that keeps a dump to connections on
//! traced ports, so the kernel builds `tcp_info` for those only. `struct inet_diag_bc_op` and
//! the op codes: include/uapi/linux/inet_diag.h; how the kernel runs and checks a program:
//! `inet_diag_bc_run` and `inet_diag_bc_audit` in net/ipv4/inet_diag.c.

/// inet_diag bytecode op codes (include/uapi/linux/inet_diag.h), all in the kernel since 2.6.
const BC_JMP: u8 = 1;
const BC_S_GE: u8 = 2;
const BC_S_LE: u8 = 3;
const BC_D_GE: u8 = 4;
const BC_D_LE: u8 = 5;
/// Ports a kernel-side filter covers; with more, every connection is dumped and filtered here
/// (a jump offset is 16 bits: 40 bytes a port).
pub const MAX_FILTER_PORTS: usize = 1024;

/// An inet_diag program (`struct inet_diag_bc_op` list) that accepts a socket whose local or
/// remote port is in `ports`; empty when `ports` is empty (no filter) or longer than
/// [`MAX_FILTER_PORTS`].
///
/// Shape: one 16-byte test per (side, port), `GE port` then `LE port`, each failing to the next
/// test; between tests a `JMP` to the end (accept). The kernel accepts when a program runs
/// exactly to its end and rejects when it jumps 4 bytes past it (`inet_diag_bc_run`); its audit
/// (`inet_diag_bc_audit`) wants every `no` target on the chain of `yes` steps, which this is.
pub fn port_filter(ports: &[u16]) -> Vec<u8> {
    if ports.is_empty() || ports.len() > MAX_FILTER_PORTS {
        return Vec::new();
    }
    let tests: Vec<(u8, u8, u16)> = ports
        .iter()
        .flat_map(|&p| [(BC_S_GE, BC_S_LE, p), (BC_D_GE, BC_D_LE, p)])
        .collect();
    let total = tests.len() * 20 - 4;
    let mut bc = Vec::with_capacity(total);
    let op = |bc: &mut Vec<u8>, code: u8, yes: u8, no: u16| {
        bc.extend_from_slice(&[code, yes]);
        bc.extend_from_slice(&no.to_ne_bytes());
    };
    for (i, (ge, le, port)) in tests.iter().enumerate() {
        // Both fail to 20 bytes past the test's start: the next test, or past the end.
        // A comparison is two ops: the code, then `{0, 0, port}` (the kernel reads op[1].no).
        op(&mut bc, *ge, 8, 20);
        op(&mut bc, 0, 0, *port);
        op(&mut bc, *le, 8, 12);
        op(&mut bc, 0, 0, *port);
        if i + 1 < tests.len() {
            let to_end = u16::try_from(total - bc.len()).unwrap_or(u16::MAX);
            op(&mut bc, BC_JMP, 4, to_end);
        }
    }
    bc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(bc: &[u8], at: usize) -> (u8, isize, isize) {
        let no = u16::from_ne_bytes([bc[at + 2], bc[at + 3]]);
        (bc[at], isize::from(bc[at + 1]), no as isize)
    }

    /// The kernel's `inet_diag_bc_run` for the ops `port_filter` uses.
    fn run(bc: &[u8], sport: u16, dport: u16) -> bool {
        let (mut len, mut at) = (bc.len() as isize, 0);
        while len > 0 {
            let (code, yes, no) = op(bc, at);
            let port = op(bc, at + 4).2 as u16;
            let ok = match code {
                BC_JMP => false,
                BC_S_GE => sport >= port,
                BC_S_LE => sport <= port,
                BC_D_GE => dport >= port,
                BC_D_LE => dport <= port,
                _ => panic!("op {code}"),
            };
            let step = if ok { yes } else { no };
            len -= step;
            at += step as usize;
        }
        len == 0
    }

    /// The kernel's `inet_diag_bc_audit` (with `valid_cc`) for those ops: true if it passes.
    fn audit(bc: &[u8]) -> bool {
        let valid_cc = |cc: isize| {
            let (mut len, mut at) = (bc.len() as isize, 0);
            while len >= 0 {
                if cc >= len {
                    return cc == len;
                }
                let yes = op(bc, at).1;
                if yes < 4 || yes & 3 != 0 {
                    return false;
                }
                len -= yes;
                at += yes as usize;
            }
            false
        };
        let (mut len, mut at) = (bc.len() as isize, 0);
        while len > 0 {
            let (code, yes, no) = op(bc, at);
            let min_len = match code {
                BC_JMP => 4,
                BC_S_GE..=BC_D_LE if len >= 8 => 8,
                _ => return false,
            };
            if no < min_len || no > len + 4 || no & 3 != 0 || (no < len && !valid_cc(len - no)) {
                return false;
            }
            if yes < min_len || yes > len + 4 || yes & 3 != 0 {
                return false;
            }
            len -= yes;
            at += yes as usize;
        }
        len == 0
    }

    #[test]
    fn port_filter_accepts_either_end_on_a_traced_port() {
        assert!(port_filter(&[]).is_empty(), "no ports: no filter");
        assert!(port_filter(&vec![1; MAX_FILTER_PORTS + 1]).is_empty());
        for ports in [&[3306][..], &[22, 3306, 8080], &[65535, 1]] {
            let bc = port_filter(ports);
            assert_eq!(bc.len(), ports.len() * 40 - 4);
            assert!(audit(&bc), "{ports:?}: the kernel's audit would refuse it");
            for &p in ports {
                assert!(run(&bc, p, 40000) && run(&bc, 40000, p), "{p}");
            }
            for (s, d) in [(40000, 40001), (3305, 3307), (3307, 3305), (0, 0)] {
                assert_eq!(
                    run(&bc, s, d),
                    ports.contains(&s) || ports.contains(&d),
                    "{s} {d}"
                );
            }
        }
        let big = port_filter(&(1..=MAX_FILTER_PORTS as u16).collect::<Vec<_>>());
        assert!(audit(&big) && run(&big, 9, MAX_FILTER_PORTS as u16) && !run(&big, 0, 5000));
    }
}
