use super::*;

#[test]
fn defaults_validate() {
    NodeConfig::with_data_dir("/tmp/x").validate().unwrap();
    NodeConfig::local_test("/tmp/x").validate().unwrap();
}

#[test]
fn template_parses_and_applies() {
    let file = FileConfig::parse(Path::new("t.toml"), &commented_template("ops")).unwrap();
    let mut cfg = NodeConfig::with_data_dir("/tmp/x");
    cfg.apply_file(file).unwrap();
    assert_eq!(cfg.mesh, "ops");
    cfg.validate().unwrap();
}

#[test]
fn unknown_key_is_named() {
    let err = FileConfig::parse(Path::new("t.toml"), "[network]\nlisten_addr = []\n")
        .unwrap_err()
        .to_string();
    assert!(err.contains("listen_addr"), "{err}");
}

#[test]
fn bad_multiaddr_is_named() {
    let file = FileConfig::parse(
        Path::new("t.toml"),
        "[network]\nbootstrap = [\"not-an-addr\"]\n",
    )
    .unwrap();
    let err = NodeConfig::with_data_dir("/x")
        .apply_file(file)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("network.bootstrap") && err.contains("not-an-addr"),
        "{err}"
    );
}

#[test]
fn bad_mesh_rejected() {
    assert!(validate_mesh_name("Prod Mesh").is_err());
    assert!(validate_mesh_name("").is_err());
    validate_mesh_name("prod-eu_1").unwrap();
}

#[test]
fn network_timers_apply_and_zero_is_refused() {
    let file = FileConfig::parse(
        Path::new("t.toml"),
        "[network]\nidle_timeout_secs = 30\nmin_peers = 4\nkad_bootstrap_secs = 900\n",
    )
    .unwrap();
    let mut cfg = NodeConfig::with_data_dir("/x");
    cfg.apply_file(file).unwrap();
    assert_eq!(cfg.network.idle_timeout, Duration::from_secs(30));
    assert_eq!(cfg.network.min_peers, 4);
    assert_eq!(cfg.network.kad_bootstrap_interval, Duration::from_secs(900));
    cfg.validate().unwrap();
    for (key, toml) in [
        ("idle_timeout_secs", "[network]\nidle_timeout_secs = 0\n"),
        ("kad_bootstrap_secs", "[network]\nkad_bootstrap_secs = 0\n"),
    ] {
        let mut cfg = NodeConfig::with_data_dir("/x");
        cfg.apply_file(FileConfig::parse(Path::new("t.toml"), toml).unwrap())
            .unwrap();
        let err = cfg.validate().unwrap_err().to_string();
        assert!(err.contains(key), "{err}");
    }
}

#[test]
fn refresh_must_be_below_ttl() {
    let mut cfg = NodeConfig::with_data_dir("/x");
    cfg.discovery.refresh_interval = cfg.discovery.ad_ttl;
    assert!(
        cfg.validate()
            .unwrap_err()
            .to_string()
            .contains("refresh_secs")
    );
}

mod example_files {
    use super::*;

    /// The shipped examples must stay valid.
    #[test]
    fn node_config_examples_parse_and_validate() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("node-config");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            let file = FileConfig::load(&path).unwrap();
            let mut cfg = NodeConfig::with_data_dir("/tmp/x");
            cfg.apply_file(file)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            cfg.validate()
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            seen += 1;
        }
        assert!(seen >= 3);
    }
}

#[test]
fn plaintext_is_refused_on_tcp() {
    let mut cfg = NodeConfig::with_data_dir("/x");
    cfg.network.memory_plaintext = true;
    let err = cfg.validate().unwrap_err().to_string();
    assert!(err.contains("memory transport"), "{err}");
    cfg.network.transport = TransportKind::Memory;
    cfg.validate().unwrap();
}
