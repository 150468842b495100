//! Kafka security against the real broker process, Apache Kafka (`scripts/kafka.sh start
//! --sasl-scram --tls`): SCRAM logins, TLS with a certificate authority made by the test, the
//! password from a mounted file or from the environment, and the worker's error when the
//! brokers refuse its login or it does not trust their certificate.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use super::common::e2e::*;

#[path = "security/tls.rs"]
mod tls;

/// The worker's user (SCRAM-SHA-512) and the cameras' (SCRAM-SHA-256, the test's client).
const WORKER: (&str, &str) = ("clipqc", "worker-pw-7f3a9c");
const CAMERA: (&str, &str) = ("camera", "camera-pw-91c2e4");

/// A broker that requires SCRAM logins, with the test's users and topics.
struct Secured {
    broker: Broker,
    topics: Topics,
    /// The broker's database and log, the certificates, the workers' configs and logs.
    dir: tempfile::TempDir,
    /// The CA the broker's certificate is from, when there is TLS.
    authority: Option<tls::Authority>,
}

impl Secured {
    /// A worker of the test's group on this broker: see [`Worker::named`].
    fn worker<'a>(&'a self, name: &'a str) -> Start<'a> {
        Worker::named(&self.broker, &self.topics, name, self.dir.path())
    }

    /// A broker whose clients' listener requires SCRAM logins (the worker's and the cameras'
    /// users are made when its store is formatted), over TLS with a certificate from a CA made
    /// here when `tls`; the topics are made through its internal listener.
    fn start(name: &str, tls: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let users = [WORKER, CAMERA].map(|(u, p)| format!("{u}:{p}"));
        let mut args = vec!["--sasl-scram", "--user", &users[0], "--user", &users[1]];
        let authority = tls.then(|| {
            let authority = tls::Authority::new(dir.path(), "clipqc test CA");
            let (cert, key) = authority.broker_certificate();
            // Kafka's PEM key store: the PKCS#8 key and the certificate in one file, where
            // kafka.sh looks for it.
            let tls = dir.path().join("kafka/tls");
            std::fs::create_dir_all(&tls).unwrap();
            std::fs::write(tls.join("broker.pem"), [key, cert].concat()).unwrap();
            authority
        });
        if tls {
            args.push("--tls");
        }
        let mut client = vec![
            ("security.protocol", protocol(tls)),
            ("sasl.mechanism", "SCRAM-SHA-256"),
            ("sasl.username", CAMERA.0),
            ("sasl.password", CAMERA.1),
        ];
        if let Some(a) = &authority {
            client.push(("ssl.ca.location", a.pem.to_str().unwrap()));
        }
        let client = client
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let broker = Broker::start_in(&dir.path().join("kafka"), None, &args, client);
        let topics = Topics::create(&broker, name, 2);
        Self {
            broker,
            topics,
            dir,
            authority,
        }
    }

    /// The worker's Kafka settings from the environment, as a Deployment would set them,
    /// trusting the CA at `ca` (TLS only); the password comes separately.
    fn worker_env(&self, ca: Option<&Path>) -> Vec<(&'static str, String)> {
        let mut env = vec![
            (
                "CLIPQC__KAFKA__PROPERTIES__SECURITY_PROTOCOL",
                protocol(self.authority.is_some()).to_string(),
            ),
            (
                "CLIPQC__KAFKA__PROPERTIES__SASL_MECHANISM",
                "SCRAM-SHA-512".to_string(),
            ),
            (
                "CLIPQC__KAFKA__PROPERTIES__SASL_USERNAME",
                WORKER.0.to_string(),
            ),
        ];
        if let Some(ca) = ca {
            env.push((
                "CLIPQC__KAFKA__PROPERTIES__SSL_CA_LOCATION",
                ca.display().to_string(),
            ));
        }
        env
    }
}

/// A worker the brokers refuse stops at its start-up check of them: after loading the model,
/// [`START_WITHIN`] at most, the check ends at the refusal, which the broker answers at once
/// (and the worker bounds the check itself at 60 s). A bound on a worker that goes on.
const REFUSED_WITHIN: Duration = START_WITHIN;

fn protocol(tls: bool) -> &'static str {
    if tls {
        "SASL_SSL"
    } else {
        "SASL_PLAINTEXT"
    }
}

/// The worker logs in with SCRAM-SHA-512 over TLS, its password read from a file (a mounted
/// Kubernetes secret, with the newline `echo` leaves), and every request gets its verdict,
/// the bad ones their dead letter; the cameras' client logs in with SCRAM-SHA-256. The
/// password is in none of the worker's log lines.
#[test]
#[ignore = "needs Apache Kafka (scripts/kafka.sh) and the Python Kafka client (scripts/test.sh)"]
fn scram_logins_over_tls_get_every_verdict_from_the_real_broker() {
    let _serial = serial();
    let s = Secured::start("secure", true);
    let images = ImageServer::start(&super::common::fixtures().join("images"));
    let secret = s.dir.path().join("kafka-password");
    std::fs::write(&secret, format!("{}\n", WORKER.1)).unwrap();
    let extra = format!(
        "[kafka.property_files]\n\"sasl.password\" = \"{}\"\n",
        secret.display()
    );
    let ca = s.authority.as_ref().map(|a| a.pem.as_path());
    let worker = s
        .worker("secure-1")
        .config(&extra)
        .env(&s.worker_env(ca))
        .start();
    let published = produce(
        &s.broker,
        &s.topics.requests,
        20,
        &images.url("part_250.jpg"),
        10,
    );
    assert_eq!(published.len(), 20, "the cameras' client logged in");
    let bad = bad(&published);
    let verdicts = read_all(&s.broker, &s.topics.verdicts, 20, START_WITHIN);
    let answered: HashSet<_> = verdicts.iter().map(ReadBack::source).collect();
    assert_eq!(answered.len(), 20, "{}", worker.log_tail());
    for v in &verdicts {
        let outcome = &v.verdict.as_ref().expect("JSON verdicts")["outcome"];
        assert_eq!(
            outcome == "OUTCOME_ERROR",
            bad.contains(&v.source()),
            "{v:?}"
        );
    }
    let dead = read_all(&s.broker, &s.topics.dlq, bad.len(), IDLE);
    let dead: HashSet<_> = dead.iter().map(ReadBack::source).collect();
    assert_eq!(dead, bad, "each bad request also on the dead-letter topic");
    let log = worker.log.clone();
    assert!(worker.terminate(), "clean exit on SIGTERM");
    let log = std::fs::read_to_string(log).unwrap();
    assert!(!log.contains(WORKER.1), "the password was logged");
}

/// A wrong password (from the environment): the worker stops with an error that says the
/// brokers refused its login and names the settings to check, not the password. Before, it
/// failed after 10 s with "broker transport failure", which named neither.
#[test]
#[ignore = "needs Apache Kafka (scripts/kafka.sh) and the Python Kafka client (scripts/test.sh)"]
fn a_wrong_password_stops_the_worker_with_an_authentication_error() {
    let _serial = serial();
    let s = Secured::start("wrong-password", false);
    let mut env = s.worker_env(None);
    env.push((
        "CLIPQC__KAFKA__PROPERTIES__SASL_PASSWORD",
        "not-the-pw-5e1d".to_string(),
    ));
    let worker = s.worker("wrong-1").env(&env).start();
    let log = worker.log.clone();
    let error = worker.refused(REFUSED_WITHIN, "the brokers' check at start-up");
    assert!(
        error.starts_with(&format!(
            "error: the Kafka brokers {} refused the worker's authentication: ",
            s.broker.brokers()
        )) && error.contains("SASL authentication error")
            && error.contains("invalid credentials with SASL mechanism SCRAM-SHA-512")
            && error.contains("sasl.username \"clipqc\"")
            && error.contains("CLIPQC__KAFKA__PROPERTIES__SASL_PASSWORD"),
        "{error}"
    );
    let log = std::fs::read_to_string(log).unwrap();
    assert!(!log.contains("not-the-pw-5e1d"), "the password was logged");
    eprintln!("wrong password: {error}");
}

/// The worker trusts another CA than the broker's certificate is from: it stops with an
/// error that says TLS failed and why, and names its `ssl.ca.location`.
#[test]
#[ignore = "needs Apache Kafka (scripts/kafka.sh) and the Python Kafka client (scripts/test.sh)"]
fn a_broker_certificate_the_worker_does_not_trust_stops_it_with_a_tls_error() {
    let _serial = serial();
    let s = Secured::start("untrusted", true);
    let other = tls::Authority::new(s.dir.path(), "another CA");
    let mut env = s.worker_env(Some(&other.pem));
    env.push((
        "CLIPQC__KAFKA__PROPERTIES__SASL_PASSWORD",
        WORKER.1.to_string(),
    ));
    let error = s
        .worker("untrusted-1")
        .env(&env)
        .start()
        .refused(REFUSED_WITHIN, "the brokers' check at start-up");
    assert!(
        error.starts_with(&format!(
            "error: TLS with the Kafka brokers {} failed: ",
            s.broker.brokers()
        )) && error.contains("certificate verify failed")
            && error.contains(&format!(
                "ssl.ca.location {:?}",
                other.pem.display().to_string()
            )),
        "{error}"
    );
    eprintln!("untrusted certificate: {error}");
}

/// `kafka.sh start --sasl-scram`: each user logs in with SCRAM-SHA-256 and with SCRAM-SHA-512;
/// PLAIN (not enabled), a wrong password and no login at all are refused.
#[test]
#[ignore = "needs Apache Kafka (scripts/kafka.sh) and the Python Kafka client (scripts/test.sh)"]
fn the_brokers_take_scram_logins_of_either_mechanism_and_refuse_others() {
    let _serial = serial();
    let s = Secured::start("mechanisms", false);
    let brokers = s.broker.brokers();
    let login = |mechanism: Option<&str>, (user, password): (&str, &str), within: u64| {
        let mut kafka = clipqc::config::KafkaSettings::default();
        let mut set = |k: &str, v: &str| kafka.properties.insert(k.into(), v.into());
        match mechanism {
            Some(m) => {
                set("security.protocol", "SASL_PLAINTEXT");
                set("sasl.mechanism", m);
                set("sasl.username", user);
                set("sasl.password", password);
            }
            None => {
                set("security.protocol", "PLAINTEXT");
            }
        }
        clipqc::brokers::check(&kafka, &brokers, Duration::from_secs(within))
    };
    // A success ends the check at the first metadata answer (milliseconds on loopback; the
    // check asks again every 500 ms): 60 s is a bound on a broker that never answers. A
    // refusal ends it when the broker answers with an authentication error; where it answers
    // nothing a client understands (no login on a SASL listener) the check runs to its bound:
    // 5 s, ten times a connection and a SASL round trip on a loaded machine.
    for mechanism in ["SCRAM-SHA-512", "SCRAM-SHA-256"] {
        for user in [WORKER, CAMERA] {
            login(Some(mechanism), user, 60)
                .unwrap_or_else(|e| panic!("{mechanism} as {}: {e}", user.0));
        }
    }
    let refused = [
        ("PLAIN, right password", login(Some("PLAIN"), WORKER, 5)),
        (
            "SCRAM-SHA-512, wrong password",
            login(Some("SCRAM-SHA-512"), (WORKER.0, "wrong"), 5),
        ),
        (
            "SCRAM-SHA-256, unknown user",
            login(Some("SCRAM-SHA-256"), ("nobody", "x"), 5),
        ),
        ("no login", login(None, WORKER, 5)),
    ];
    for (what, result) in refused {
        assert!(result.is_err(), "{what}: let in");
    }
}
