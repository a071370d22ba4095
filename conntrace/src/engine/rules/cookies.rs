//! `syncookie_ack_lost`: a listener answered a SYN with a cookie, and no socket was ever
//! created for that 4-tuple: the client's final ACK never validated here.

use crate::engine::{
    state::attempt::Cookies,
    verdict::{Detail, Outcome, Reason, Side, Verdict},
};

/// Makes an attempt's verdict the lost cookie ACK; its drops (already in the verdict) say
/// where the ACK went, when they were seen.
pub(crate) fn ack_lost(v: &mut Verdict, cookies: Cookies) {
    v.side = Side::Server;
    v.outcome = Outcome::Failed;
    v.reason = Reason::SyncookieAckLost;
    v.kernel_reason = Some("SYN cookie sent, no socket created".into());
    if let Detail::Attempt(d) = &mut v.detail {
        d.cookies_sent = Some(cookies.sent);
        d.cookie_invalid = cookies.rejected.then_some(true);
    }
}
