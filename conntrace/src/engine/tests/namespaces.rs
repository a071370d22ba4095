//! A namespace look-up for the engine's tests: which addresses are local and the route to a
//! destination, each a closure of the test's (unknown by default); nothing else is known.

use std::net::{IpAddr, SocketAddr};

use crate::engine::lookup::{ConntrackTable, NamespaceLookup, PortUse, Route, RouteKind};

type Local = Box<dyn FnMut(IpAddr) -> Option<bool>>;
type RouteTo = Box<dyn FnMut(IpAddr) -> Option<Route>>;

pub(super) struct FakeNamespaces {
    local: Local,
    route: RouteTo,
}

impl FakeNamespaces {
    pub(super) fn new() -> Self {
        Self {
            local: Box::new(|_| None),
            route: Box::new(|_| None),
        }
    }

    /// Whether an address is one of the namespace's (every namespace alike).
    pub(super) fn local(mut self, f: impl FnMut(IpAddr) -> Option<bool> + 'static) -> Self {
        self.local = Box::new(f);
        self
    }

    /// The namespace's route to a destination (`ip route get`).
    pub(super) fn route(mut self, f: impl FnMut(IpAddr) -> Option<Route> + 'static) -> Self {
        self.route = Box::new(f);
        self
    }
}

/// A route of `kind`: by `eth0` for a unicast one, through `gateway` when given.
pub(super) fn route(kind: RouteKind, gateway: Option<IpAddr>) -> Route {
    Route {
        kind,
        dev: (kind == RouteKind::Unicast).then(|| "eth0".into()),
        gateway,
    }
}

impl NamespaceLookup for FakeNamespaces {
    fn is_local(&mut self, _: Option<u32>, addr: IpAddr) -> Option<bool> {
        (self.local)(addr)
    }
    fn route_to(&mut self, _: Option<u32>, dst: IpAddr) -> Option<Route> {
        (self.route)(dst)
    }
    fn interface(&mut self, _: Option<u32>, _: u32) -> Option<String> {
        None
    }
    fn conntrack(&mut self, _: Option<u32>) -> Option<ConntrackTable> {
        None
    }
    fn ports_to(&mut self, _: Option<u32>, _: SocketAddr) -> Option<PortUse> {
        None
    }
    fn tcp_ext(&mut self, _: Option<u32>, _: &str) -> Option<u64> {
        None
    }
}
