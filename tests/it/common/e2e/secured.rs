//! Brokers beyond [`Broker::start`]'s plain one: started with more flags (`--authentication`)
//! in a folder that outlives them, so a broker started again there finds the users and topics
//! the last one was given, and advertising another port (a TLS terminator in front of it).

use super::*;

impl Broker {
    /// tansu with `args` added, its sqlite database in `dir`, listening on `port` and
    /// advertising `advertised` (where clients connect: `port`, or a proxy in front of it), to
    /// be reached with `client_properties`.
    pub fn start_in(
        dir: &Path,
        port: u16,
        advertised: u16,
        args: &[&str],
        client_properties: Vec<(String, String)>,
    ) -> Self {
        let log = std::fs::File::create(dir.join(format!("tansu-{port}.log"))).unwrap();
        let child = Command::new(tansu_bin())
            .arg("broker")
            .arg("--listener-url")
            .arg(format!("tcp://127.0.0.1:{port}"))
            .arg("--advertised-listener-url")
            .arg(format!("tcp://127.0.0.1:{advertised}"))
            // sqlite paths are relative to tansu's working directory.
            .args(["--storage-engine", "sqlite://tansu.db"])
            .args(args)
            .current_dir(dir)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start tansu ({}): {e}", tansu_bin().display()));
        wait_for_port(port, "tansu");
        Self {
            child,
            port: advertised,
            client_properties,
            _dir: None,
        }
    }

    /// `--property K=V` for each of [`Broker::client_properties`] (tests/e2e/kafka_client.py).
    pub(super) fn client_args(&self) -> Vec<String> {
        self.client_properties
            .iter()
            .flat_map(|(k, v)| ["--property".to_string(), format!("{k}={v}")])
            .collect()
    }
}
