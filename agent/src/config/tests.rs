use super::*;

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_str(text, Path::new("/etc/rampart/rampart.toml"))
}

/// The `file:line:col: message` a user would see.
fn error(text: &str) -> String {
    parse(text).unwrap_err().to_string()
}

const TWO_LISTENERS: &str = r#"
policy = ["policy.toml", "/srv/extra.toml"]
expiry_warning = "1h30m"

[events]
export_file = "events.jsonl"

[[listener]]
name = "public"
interface = "eth0"
hook = "xdp"
xdp_mode = "generic"
ports = [80, 8080]
mode = "observe"
action = "reset"
on_missing = "allow"

[[listener]]
name = "local"
interface = "lo"
hook = "tc"
ports = [8080]
"#;

#[test]
fn empty_file_is_all_defaults() {
    let c = parse("").unwrap();
    assert_eq!(
        c,
        Config {
            path: PathBuf::from("/etc/rampart/rampart.toml"),
            ..Config::default()
        }
    );
    assert_eq!(c.state_dir, Path::new("/var/lib/rampart"));
    assert_eq!(c.metrics_addr.to_string(), "127.0.0.1:9464");
    assert_eq!(c.maps.max_tokens, agent_common::DEFAULT_MAX_TOKENS);
    assert_eq!(c.maps.token_stats, 65536);
    assert_eq!(c.events.per_cpu_per_sec, 1000);
    assert_eq!(c.expiry_warning, Duration::from_secs(86400));
    assert_eq!(c.key_path(), Path::new("/var/lib/rampart/fingerprint.key"));
    assert_eq!(c.db_path(), Path::new("/var/lib/rampart/rampart.db"));
}

#[test]
fn listeners_and_relative_paths() {
    let c = parse(TWO_LISTENERS).unwrap();
    assert_eq!(
        c.policy,
        [
            PathBuf::from("/etc/rampart/policy.toml"),
            PathBuf::from("/srv/extra.toml")
        ]
    );
    assert_eq!(
        c.events.export_file,
        Some(PathBuf::from("/etc/rampart/events.jsonl"))
    );
    assert_eq!(c.expiry_warning, Duration::from_secs(5400));
    assert_eq!(c.listeners.len(), 2);
    let public = &c.listeners[0];
    assert_eq!(public.hook, Hook::Xdp(XdpMode::Generic));
    assert_eq!(public.ports, [80, 8080]);
    assert_eq!(
        public.datapath_config(7),
        ListenerConfig {
            id: 7,
            mode: mode::OBSERVE,
            action: deny_action::RESET,
            on_missing: default_policy::ALLOW,
            on_unknown: default_policy::DENY,
            on_incomplete: default_policy::DENY,
            on_not_http: default_policy::DENY,
            _pad: [0; 2],
        }
    );
    let local = &c.listeners[1];
    assert_eq!(local.hook, Hook::Tc);
    assert_eq!(
        (local.mode, local.action),
        (Mode::Enforce, DenyAction::Drop)
    );
}

#[test]
fn xdp_mode_defaults_to_native() {
    let c =
        parse("[[listener]]\nname = \"a\"\ninterface = \"eth0\"\nhook = \"xdp\"\nports = [80]\n")
            .unwrap();
    assert_eq!(c.listeners[0].hook, Hook::Xdp(XdpMode::Native));
}

#[test]
fn unknown_field() {
    assert_eq!(
        error("state_dir = \"/x\"\nstate_dri = \"/y\"\n"),
        "/etc/rampart/rampart.toml:2:1: unknown field `state_dri`, expected one of `state_dir`, \
         `bpffs_dir`, `control_socket`, `metrics_addr`, `policy`, `expiry_warning`, `maps`, \
         `events`, `listener`"
    );
}

#[test]
fn bad_values() {
    assert_eq!(
        error("expiry_warning = \"soon\"\n"),
        "/etc/rampart/rampart.toml:1:18: invalid duration `soon` (expected number at 0); write \
         it like \"30s\", \"5m\" or \"1h30m\""
    );
    assert_eq!(
        error("\n[maps]\nring_bytes = 5000\n"),
        "/etc/rampart/rampart.toml:3:14: ring_bytes 5000 must be a power of two of at least \
         4096 (whole pages)"
    );
    assert_eq!(
        error("[events]\nper_cpu_per_sec = 0\n"),
        "/etc/rampart/rampart.toml:2:19: must be at least 1"
    );
    let bad_hook = error(
        "[[listener]]\nname = \"a\"\ninterface = \"eth0\"\nhook = \"kprobe\"\nports = [80]\n",
    );
    assert!(
        bad_hook.starts_with("/etc/rampart/rampart.toml:4:8: unknown variant `kprobe`"),
        "{bad_hook}"
    );
    let bad_port = error(
        "[[listener]]\nname = \"a\"\ninterface = \"eth0\"\nhook = \"tc\"\nports = [80, 70000]\n",
    );
    assert!(
        bad_port.starts_with("/etc/rampart/rampart.toml:5:14: "),
        "{bad_port}"
    );
    let bad_addr = error("metrics_addr = \"localhost\"\n");
    assert!(
        bad_addr.starts_with("/etc/rampart/rampart.toml:1:16: "),
        "{bad_addr}"
    );
}

#[test]
fn listener_errors() {
    let listener = |name: &str, iface: &str, hook: &str, ports: &str| {
        format!("[[listener]]\nname = \"{name}\"\ninterface = \"{iface}\"\nhook = \"{hook}\"\nports = {ports}\n")
    };
    let a = listener("a", "eth0", "xdp", "[80]");
    assert_eq!(
        error(&format!("{a}{}", listener("a", "eth1", "xdp", "[80]"))),
        "/etc/rampart/rampart.toml:7:8: listener name `a` is already used at \
         /etc/rampart/rampart.toml:2:8"
    );
    assert_eq!(
        error(&listener("a", "eth0", "tc", "[80, 0]")),
        "/etc/rampart/rampart.toml:5:14: port 0 is not a valid listener port"
    );
    assert_eq!(
        error(&listener("a", "eth0", "tc", "[]")),
        "/etc/rampart/rampart.toml:5:9: listener `a` has no ports"
    );
    assert_eq!(
        error(&format!(
            "{}xdp_mode = \"native\"\n",
            listener("a", "lo", "tc", "[80]")
        )),
        "/etc/rampart/rampart.toml:6:12: `xdp_mode` applies to xdp listeners only; listener \
         `a` uses tc"
    );
    assert_eq!(
        error(&format!("{a}{}", listener("b", "eth0", "xdp", "[443, 80]"))),
        "/etc/rampart/rampart.toml:10:15: port 80 on `eth0` is already claimed by listener `a`"
    );
    assert_eq!(
        error(&listener("a", "eth0", "xdp", "[80, 80]")),
        "/etc/rampart/rampart.toml:5:14: port 80 on `eth0` is already claimed by listener `a`"
    );
    let mixed = error(&format!("{a}{}", listener("b", "eth0", "tc", "[443]")));
    assert!(
        mixed.ends_with(
            "interface `eth0` is attached with xdp (native) by listener `a`; every listener \
             on an interface must use the same hook and xdp_mode"
        ),
        "{mixed}"
    );
    // The same port on different interfaces is fine.
    assert!(parse(&format!("{a}{}", listener("b", "lo", "tc", "[80]"))).is_ok());
    let missing = error("[[listener]]\nname = \"a\"\ninterface = \"eth0\"\nports = [80]\n");
    assert!(missing.contains("missing field `hook`"), "{missing}");
}

#[test]
fn tc_attach_key() {
    let tc = |extra: &str| {
        format!(
            "[[listener]]\nname = \"a\"\ninterface = \"lo\"\nhook = \"tc\"\nports = [80]\n{extra}"
        )
    };
    let attach = |text: &str| parse(text).expect("config").listeners[0].tc_attach;
    assert_eq!(attach(&tc("")), TcAttach::Auto);
    assert_eq!(attach(&tc("tc_attach = \"netlink\"\n")), TcAttach::Netlink);
    assert_eq!(attach(&tc("tc_attach = \"tcx\"\n")), TcAttach::Tcx);
    let bad = error(&tc("tc_attach = \"ioctl\"\n"));
    assert!(
        bad.starts_with("/etc/rampart/rampart.toml:6:13: ") && bad.contains("unknown variant"),
        "{bad}"
    );
    assert_eq!(
        error(
            "[[listener]]\nname = \"a\"\ninterface = \"lo\"\nhook = \"xdp\"\nports = [80]\n\
             tc_attach = \"tcx\"\n"
        ),
        "/etc/rampart/rampart.toml:6:13: `tc_attach` applies to tc listeners only; listener \
         `a` uses xdp"
    );
    let two = format!(
        "{}{}",
        tc("tc_attach = \"netlink\"\n"),
        tc("").replace("\"a\"", "\"b\"").replace("[80]", "[81]")
    );
    let mixed = error(&two);
    assert!(
        mixed.starts_with("/etc/rampart/rampart.toml:7:1: ")
            && mixed.ends_with(
                "interface `lo` is attached with tc_attach = \"netlink\" by listener `a`; \
                 every listener on an interface must use the same tc_attach"
            ),
        "{mixed}"
    );
}

#[test]
fn too_many_listeners() {
    let mut text = String::new();
    for i in 0..=MAX_LISTENERS {
        text.push_str(&format!(
            "[[listener]]\nname = \"l{i}\"\ninterface = \"lo\"\nhook = \"tc\"\nports = [{}]\n",
            1000 + i
        ));
    }
    let err = error(&text);
    // The 65th listener starts on line 64 × 5 + 1.
    assert!(
        err.starts_with("/etc/rampart/rampart.toml:321:1: more than 64 listeners"),
        "{err}"
    );
    let ok = text.rsplit_once("[[listener]]").unwrap().0;
    assert_eq!(parse(ok).unwrap().listeners.len(), 64);
}

#[test]
fn examples_pass_check() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/rampart.toml");
    let (config, policy) = match load_all(&path) {
        Ok(loaded) => loaded,
        Err(diags) => panic!(
            "examples/ should pass `rampart check`:\n{}",
            diags
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        ),
    };
    let hooks: Vec<Hook> = config.listeners.iter().map(|l| l.hook).collect();
    assert_eq!(hooks, [Hook::Xdp(XdpMode::Native), Hook::Tc]);
    assert_eq!(config.policy, [path.parent().unwrap().join("policy.toml")]);
    assert_eq!(
        (
            policy.contracts.len(),
            policy.scopes.len(),
            policy.tokens.len()
        ),
        (2, 3, 1)
    );
    let batch = &policy.contracts[policy.contract_index("batch").unwrap() as usize].1;
    assert_eq!((batch.n_stages, batch.penalty_stages), (7, 1));
}

#[test]
fn unreadable_file() {
    let err = Config::load(Path::new("/nonexistent/rampart.toml")).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }));
    assert!(err
        .into_diagnostic()
        .to_string()
        .starts_with("/nonexistent/rampart.toml: cannot read configuration: "));
}

#[test]
fn respond_action_with_realm_and_problem_type() {
    let listener = |name: &str, iface: &str, hook: &str, ports: &str| {
        format!("[[listener]]\nname = \"{name}\"\ninterface = \"{iface}\"\nhook = \"{hook}\"\nports = {ports}\n")
    };
    let c = parse(&format!(
        "{}action = \"respond\"\nrealm = \"orders\"\nproblem_type = \"https://example.com/p\"\n",
        listener("a", "eth0", "xdp", "[80]")
    ))
    .unwrap();
    let l = &c.listeners[0];
    assert_eq!(l.action, DenyAction::Respond);
    assert_eq!(l.datapath_config(0).action, deny_action::RESPOND);
    assert_eq!(l.response.realm, "orders");
    assert_eq!(l.response.problem_type, "https://example.com/p");
    // Defaults.
    let c = parse(&listener("a", "eth0", "xdp", "[80]")).unwrap();
    assert_eq!(
        c.listeners[0].response,
        crate::respond::ResponseConfig::default()
    );
    let bad = error(&format!(
        "{}realm = \"a\\\"b\"\n",
        listener("a", "eth0", "xdp", "[80]")
    ));
    assert!(
        bad.starts_with("/etc/rampart/rampart.toml:6:9: `realm` must be"),
        "{bad}"
    );
    let bad = error(&format!(
        "{}problem_type = \"not a uri\"\n",
        listener("a", "eth0", "xdp", "[80]")
    ));
    assert!(bad.contains("`problem_type` must be a URI"), "{bad}");
}
