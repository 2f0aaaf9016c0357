//! The standard test topology, three namespaces in a line:
//!
//! ```text
//!  client ns                gateway ns                                 upstream ns
//!  c-gw 10.203.1.1 ──veth── gw-c 10.203.1.2   gw-up 10.203.2.1 ──veth── up-gw 10.203.2.2
//!   curl / wrk              nginx TLS :8443 ──────────────────────────▶ upstream :8080
//!                           nginx TLS :8444 ──▶ lo 127.0.0.1:8081 (loopback upstream)
//! ```
//! (IPv6: fd00:203:1::{1,2}/64 and fd00:203:2::{1,2}/64.)
//!
//! Rampart attaches native XDP to `up-gw` (the veth end inside the upstream namespace,
//! see [`Topology::upstream_veth`]) and/or TC on the gateway's `lo`. A frame XDP_TX'd on
//! `up-gw` reaches `gw-up` only if `gw-up` also has an XDP program (a pass-through one
//! suffices): that is [`Topology::gateway_upstream_veth`].
//!
//! Everything is torn down on drop, in field order: nginx, upstream servers, namespaces
//! (with any process still inside them).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    process::Output,
    time::Duration,
};

use crate::{
    client::Curl,
    netns::{self, Interface, Netns, NetnsError, VethConfig, VethPair},
    nginx::{Nginx, NginxConfig, NginxError, Route},
    upstream::{UpstreamError, UpstreamServer},
};

pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 203, 1, 1);
pub const GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(10, 203, 1, 2);
pub const GATEWAY_UPLINK_V4: Ipv4Addr = Ipv4Addr::new(10, 203, 2, 1);
pub const UPSTREAM_V4: Ipv4Addr = Ipv4Addr::new(10, 203, 2, 2);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x203, 1, 0, 0, 0, 0, 1);
pub const GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x203, 1, 0, 0, 0, 0, 2);
pub const GATEWAY_UPLINK_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x203, 2, 0, 0, 0, 0, 1);
pub const UPSTREAM_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x203, 2, 0, 0, 0, 0, 2);

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("setting up namespaces and veths: {0}")]
    Network(#[source] NetnsError),
    #[error("starting the upstream servers: {0}")]
    Upstream(#[source] UpstreamError),
    #[error("starting nginx in the gateway namespace: {0}")]
    Nginx(#[source] NginxError),
}

/// Which namespace of the topology.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Client,
    Gateway,
    Upstream,
}

#[derive(Debug, Clone)]
pub struct TopologyBuilder {
    veth_route_port: u16,
    loopback_route_port: u16,
    upstream_port: u16,
    loopback_upstream_port: u16,
    nginx: NginxConfig,
}

impl Default for TopologyBuilder {
    fn default() -> Self {
        Self {
            // Fixed ports are fine: every topology has its own namespaces.
            veth_route_port: 8443,
            loopback_route_port: 8444,
            upstream_port: 8080,
            loopback_upstream_port: 8081,
            nginx: NginxConfig::default(),
        }
    }
}

impl TopologyBuilder {
    /// TLS port on the gateway proxying to the upstream namespace over the veth.
    pub fn veth_route_port(mut self, port: u16) -> Self {
        self.veth_route_port = port;
        self
    }

    /// TLS port on the gateway proxying to the upstream on the gateway's own loopback.
    pub fn loopback_route_port(mut self, port: u16) -> Self {
        self.loopback_route_port = port;
        self
    }

    /// Port of the upstream server in the upstream namespace.
    pub fn upstream_port(mut self, port: u16) -> Self {
        self.upstream_port = port;
        self
    }

    /// Port of the upstream server on the gateway's 127.0.0.1.
    pub fn loopback_upstream_port(mut self, port: u16) -> Self {
        self.loopback_upstream_port = port;
        self
    }

    /// How long nginx waits for an upstream answer (default 2 s): a request dropped
    /// after nginx turns into a 504 after this long.
    pub fn proxy_read_timeout(mut self, timeout: Duration) -> Self {
        self.nginx.read_timeout = timeout;
        self
    }

    pub fn nginx_workers(mut self, n: u32) -> Self {
        self.nginx.worker_processes = n;
        self
    }

    /// Creates the namespaces and links, starts both upstreams and nginx. Stale `rmp-*`
    /// namespaces of dead processes are removed first.
    pub fn build(self) -> Result<Topology, TopologyError> {
        netns::require_root().map_err(TopologyError::Network)?;
        netns::cleanup_stale();
        let net = TopologyError::Network;
        let client = Netns::new("cli").map_err(net)?;
        let gateway = Netns::new("gw").map_err(net)?;
        let upstream = Netns::new("up").map_err(net)?;
        let client_link = VethPair::create(
            &client,
            VethConfig {
                name: "c-gw",
                ipv4: CLIENT_V4,
                ipv6: CLIENT_V6,
            },
            &gateway,
            VethConfig {
                name: "gw-c",
                ipv4: GATEWAY_V4,
                ipv6: GATEWAY_V6,
            },
        )
        .map_err(net)?;
        let upstream_link = VethPair::create(
            &gateway,
            VethConfig {
                name: "gw-up",
                ipv4: GATEWAY_UPLINK_V4,
                ipv6: GATEWAY_UPLINK_V6,
            },
            &upstream,
            VethConfig {
                name: "up-gw",
                ipv4: UPSTREAM_V4,
                ipv6: UPSTREAM_V6,
            },
        )
        .map_err(net)?;
        let gateway_lo = Interface {
            ns: gateway.name().to_owned(),
            name: "lo".into(),
            ifindex: gateway.ifindex("lo").map_err(net)?,
            ipv4: Ipv4Addr::LOCALHOST,
            ipv6: Ipv6Addr::LOCALHOST,
        };

        // Dual-stack wildcard: reachable over the veth by IPv4 and IPv6.
        let veth_upstream = UpstreamServer::start(
            &upstream,
            "veth-upstream",
            SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), self.upstream_port),
        )
        .map_err(TopologyError::Upstream)?;
        let loopback_upstream = UpstreamServer::start(
            &gateway,
            "loopback-upstream",
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), self.loopback_upstream_port),
        )
        .map_err(TopologyError::Upstream)?;

        let mut nginx_cfg = self.nginx;
        nginx_cfg.routes = vec![
            Route {
                name: "veth_upstream".into(),
                listen_port: self.veth_route_port,
                upstream: SocketAddr::new(IpAddr::V4(UPSTREAM_V4), veth_upstream.port()),
            },
            Route {
                name: "loopback_upstream".into(),
                listen_port: self.loopback_route_port,
                upstream: loopback_upstream.addr(),
            },
        ];
        nginx_cfg.cert_ips = vec![IpAddr::V4(GATEWAY_V4), IpAddr::V6(GATEWAY_V6)];
        let nginx = Nginx::start(&gateway, nginx_cfg).map_err(TopologyError::Nginx)?;

        Ok(Topology {
            nginx,
            veth_upstream,
            loopback_upstream,
            client_link,
            upstream_link,
            gateway_lo,
            veth_route_port: self.veth_route_port,
            loopback_route_port: self.loopback_route_port,
            client,
            gateway,
            upstream,
        })
    }
}

/// A running topology. Field order is drop order.
#[derive(Debug)]
pub struct Topology {
    nginx: Nginx,
    veth_upstream: UpstreamServer,
    loopback_upstream: UpstreamServer,
    client_link: VethPair,
    upstream_link: VethPair,
    gateway_lo: Interface,
    veth_route_port: u16,
    loopback_route_port: u16,
    client: Netns,
    gateway: Netns,
    upstream: Netns,
}

impl Topology {
    pub fn builder() -> TopologyBuilder {
        TopologyBuilder::default()
    }

    pub fn ns(&self, role: Role) -> &Netns {
        match role {
            Role::Client => &self.client,
            Role::Gateway => &self.gateway,
            Role::Upstream => &self.upstream,
        }
    }

    pub fn client(&self) -> &Netns {
        &self.client
    }

    pub fn gateway(&self) -> &Netns {
        &self.gateway
    }

    pub fn upstream(&self) -> &Netns {
        &self.upstream
    }

    /// Runs a command in one of the namespaces to completion; non-zero exit is an error.
    pub fn exec_in(&self, role: Role, args: &[&str]) -> Result<Output, NetnsError> {
        self.ns(role).exec(args)
    }

    /// Gateway address clients connect to.
    pub fn gateway_ip(&self) -> Ipv4Addr {
        GATEWAY_V4
    }

    pub fn gateway_ipv6(&self) -> Ipv6Addr {
        GATEWAY_V6
    }

    /// `https://10.203.1.2:<port>`: TLS route proxied over the veth to the upstream ns.
    pub fn veth_route_url(&self) -> String {
        format!("https://{}:{}", GATEWAY_V4, self.veth_route_port)
    }

    /// `https://10.203.1.2:<port>`: TLS route proxied to the gateway's loopback upstream.
    pub fn loopback_route_url(&self) -> String {
        format!("https://{}:{}", GATEWAY_V4, self.loopback_route_port)
    }

    /// `https://[fd00:203:1::2]:<port>` for the veth route over IPv6.
    pub fn veth_route_url_v6(&self) -> String {
        format!("https://[{}]:{}", GATEWAY_V6, self.veth_route_port)
    }

    /// curl in the client ns against the veth route.
    pub fn curl_veth(&self) -> Curl<'_> {
        Curl::new(&self.client, &self.veth_route_url())
    }

    /// curl in the client ns against the loopback route.
    pub fn curl_loopback(&self) -> Curl<'_> {
        Curl::new(&self.client, &self.loopback_route_url())
    }

    /// `up-gw`: the veth end inside the upstream ns, where Rampart attaches native XDP.
    /// Its ingress carries nginx → upstream requests in plaintext.
    pub fn upstream_veth(&self) -> &Interface {
        &self.upstream_link.b
    }

    /// `gw-up`: the peer end in the gateway ns. Needs an XDP program of its own (e.g.
    /// pass-through) for frames XDP_TX'd on `up-gw` to arrive here.
    pub fn gateway_upstream_veth(&self) -> &Interface {
        &self.upstream_link.a
    }

    /// `c-gw`: the client's end of the client link.
    pub fn client_veth(&self) -> &Interface {
        &self.client_link.a
    }

    /// `gw-c`: the gateway's end of the client link (TLS traffic only).
    pub fn gateway_client_veth(&self) -> &Interface {
        &self.client_link.b
    }

    /// The gateway ns's `lo`, carrying nginx → loopback-upstream plaintext.
    pub fn gateway_lo(&self) -> &Interface {
        &self.gateway_lo
    }

    /// Upstream in the upstream ns, reached over the veth.
    pub fn veth_upstream(&self) -> &UpstreamServer {
        &self.veth_upstream
    }

    /// Upstream on the gateway's 127.0.0.1.
    pub fn loopback_upstream(&self) -> &UpstreamServer {
        &self.loopback_upstream
    }

    pub fn upstream_port(&self) -> u16 {
        self.veth_upstream.port()
    }

    pub fn loopback_upstream_port(&self) -> u16 {
        self.loopback_upstream.port()
    }

    pub fn nginx(&self) -> &Nginx {
        &self.nginx
    }

    /// Names of the three namespaces (client, gateway, upstream).
    pub fn namespace_names(&self) -> [String; 3] {
        [
            self.client.name().to_owned(),
            self.gateway.name().to_owned(),
            self.upstream.name().to_owned(),
        ]
    }
}
