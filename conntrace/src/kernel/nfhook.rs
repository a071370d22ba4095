//! Which netfilter hook dropped a packet, from the kernel stack recorded with the drop.
//!
//! `NF_DROP` frees the packet in `nf_hook_slow`, called (through the inline `NF_HOOK`) by the
//! function that owns the hook point: `ip_local_deliver` runs the INPUT hook, `__ip_local_out`
//! the OUTPUT hook, and so on. The innermost stack frame in one of those functions names the
//! hook. Function names are stable across the kernels we support; a kernel that renamed or
//! fully inlined one gives no hook, never a wrong one.

use crate::engine::facts::NfHook;

/// Hook-owning functions, IPv4 and IPv6.
const CALLERS: &[(&str, NfHook)] = &[
    ("ip_rcv", NfHook::PreRouting),
    ("ip_sublist_rcv", NfHook::PreRouting),
    ("ip_list_rcv", NfHook::PreRouting),
    ("ipv6_rcv", NfHook::PreRouting),
    ("ip6_sublist_rcv", NfHook::PreRouting),
    ("ipv6_list_rcv", NfHook::PreRouting),
    ("ip_local_deliver", NfHook::Input),
    ("ip6_input", NfHook::Input),
    ("ip_forward", NfHook::Forward),
    ("ip6_forward", NfHook::Forward),
    ("__ip_local_out", NfHook::Output),
    ("ip_local_out", NfHook::Output),
    ("__ip6_local_out", NfHook::Output),
    ("ip6_local_out", NfHook::Output),
    ("ip6_xmit", NfHook::Output),
    ("ip_output", NfHook::PostRouting),
    ("ip_mc_output", NfHook::PostRouting),
    ("ip6_output", NfHook::PostRouting),
];

/// The hook of the innermost frame that belongs to a hook-owning function. `symbol` names a
/// return address (`None` when no symbol covers it).
pub fn hook_from_stack<'a>(frames: impl IntoIterator<Item = Option<&'a str>>) -> Option<NfHook> {
    frames.into_iter().flatten().find_map(|name| {
        // Compiler clones: `ip_rcv.cold`, `ip_output.isra.0`.
        let base = name.split('.').next().unwrap_or(name);
        CALLERS
            .iter()
            .find(|(caller, _)| *caller == base)
            .map(|(_, hook)| *hook)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn innermost_hook_owner_wins() {
        // A RST sent in reply to a received segment, dropped by OUTPUT: the receive path's
        // INPUT hook frame is further out and must not be taken.
        let stack = [
            Some("bpf_trace_run4"),
            Some("sk_skb_reason_drop"),
            Some("nf_hook_slow"),
            Some("__ip_local_out"),
            Some("ip_send_unicast_reply"),
            Some("tcp_v4_rcv"),
            Some("ip_local_deliver"),
        ];
        assert_eq!(hook_from_stack(stack), Some(NfHook::Output));
    }

    #[test]
    fn compiler_clones_and_unknown_frames() {
        let stack = [None, Some("nf_hook_slow"), Some("ip_local_deliver.cold")];
        assert_eq!(hook_from_stack(stack), Some(NfHook::Input));
        assert_eq!(hook_from_stack([Some("ip6_input")]), Some(NfHook::Input));
        assert_eq!(hook_from_stack([Some("nf_hook_slow"), None]), None);
        // A prefix of a hook owner is not that owner.
        assert_eq!(hook_from_stack([Some("ip_rcv_core")]), None);
    }
}
