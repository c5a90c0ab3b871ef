//! The dead-letter API behind its bearer token, against the real service (`run`, with its
//! RabbitMQ queues, its Kafka replay topic and its SQLite archive) and the real CLI: who gets
//! in, what a malformed or too wide request gets, what a store failure shows, and what the
//! service refuses to start with.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use iotp_contract::topology::RabbitTopology;
use iotp_contract::DeadLetter;
use iotp_core::admin::Health;
use iotp_core::dead_letter::{DeadLetterConfig, DeadLetterPublisher};
use iotp_core::kafka::KafkaConfig;
use iotp_core::retry::Backoff;
use iotp_core::service::Context;
use iotp_core::testkit::*;
use iotp_dlq_handler::DlqConfig;
use iotp_store::sqlite::SqliteStore;
use iotp_store::{DeadLetterArchive, LetterFilter, StoreConfig};
use tokio_util::sync::CancellationToken;

/// The service's token (64 hex characters, as `openssl rand -hex 32` makes).
const TOKEN: &str = "5f0c1e7a9b2d4c6e8f1a3b5c7d9e0f2a4b6c8d0e2f4a6b8c0d2e4f6a8b0c2d4e";
const WRONG: &str = "0000000000000000000000000000000000000000000000000000000000000000";

struct Rig {
    dir: PathBuf,
    /// Where the letters came from, and where a replay puts them back.
    source: String,
    ids: Vec<String>,
    config: DlqConfig,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Rig {
    /// The handler with its token, and two parked `unknown_device` letters in its archive.
    async fn start() -> Self {
        let dir = std::env::temp_dir().join(unique("dlq-api-"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("token"), format!("{TOKEN}\n")).unwrap();
        let source = unique("test.validated.");
        create_topic(&source, 1).await;
        let names = unique("test.dlq-api.");
        let topo = RabbitTopology {
            dead_letter_exchange: format!("{names}.dead-letter"),
            incoming_queue: format!("{names}.incoming"),
            retry_exchange: format!("{names}.retry"),
            retry_delays: vec![Duration::from_millis(300).into()],
            parking_queue: format!("{names}.parking"),
        };
        let conn = iotp_core::amqp::connect(&amqp_uri()).await.unwrap();
        let channel = conn.create_channel().await.unwrap();
        iotp_core::amqp::declare_topology(&channel, &topo)
            .await
            .unwrap();
        let _ = conn.close(200, "ok".into()).await;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = DlqConfig {
            kafka: KafkaConfig {
                brokers: kafka_brokers(),
                ..KafkaConfig::default()
            },
            amqp_uri: amqp_uri(),
            rabbitmq: topo.clone(),
            store: StoreConfig {
                path: dir.join("dlq.sqlite"),
                ..StoreConfig::default()
            },
            api_listen: SocketAddr::from(([127, 0, 0, 1], port)),
            api_token_file: Some(dir.join("token")),
            ..DlqConfig::default()
        };
        let shutdown = CancellationToken::new();
        let health = Health::default();
        let ctx = Context {
            service: "dlq-handler",
            replica: unique("dlq-api-"),
            shutdown: shutdown.clone(),
            health: health.clone(),
            backoff: Backoff::default(),
        };
        let task = tokio::spawn(iotp_dlq_handler::run(ctx, config.clone()));
        for _ in 0..200 {
            if health.is_ready() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(health.is_ready(), "handler ready");

        let mut publisher = DeadLetterPublisher::new(DeadLetterConfig {
            amqp_uri: amqp_uri(),
            exchange: topo.dead_letter_exchange.clone(),
            ..Default::default()
        })
        .unwrap();
        let ids: Vec<String> = (0..2).map(|i| format!("enricher/{source}/0/{i}")).collect();
        for (i, id) in ids.iter().enumerate() {
            let letter = DeadLetter {
                id: id.clone(),
                stage: "enricher".into(),
                reason_code: "unknown_device".into(),
                error: "device not registered".into(),
                source_topic: Some(source.clone()),
                source_partition: Some(0),
                source_offset: Some(i as i64),
                key: Some(format!("acme/dev-{i}").into_bytes()),
                payload: format!("payload of dev-{i}").into_bytes(),
                tenant: Some("acme".into()),
                device_id: Some(format!("dev-{i}")),
                attempts: 1,
                first_failure_at: 1,
                last_failure_at: 1,
            };
            publisher.publish(&letter, false).await.unwrap();
        }
        publisher.close().await;
        let rig = Self {
            dir,
            source,
            ids,
            config,
            shutdown,
            task,
        };
        let archived = rig.archived().await;
        assert_eq!(archived.len(), 2, "both letters parked and archived");
        rig
    }

    /// The archive, once it holds both letters (or after 30 s).
    async fn archived(&self) -> Vec<iotp_store::Archived> {
        let store = SqliteStore::open(Path::new(&self.config.store.path)).unwrap();
        let all = LetterFilter {
            include_replayed: true,
            ..LetterFilter::default()
        };
        for _ in 0..120 {
            let found = store.letters(&all).await.unwrap();
            if found.len() >= 2 {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        store.letters(&all).await.unwrap()
    }

    /// Records on the source topic within `wait`: replays.
    async fn replayed_records(&self, wait: Duration) -> usize {
        read_topic(&self.source, wait, |r| r.len() >= 2).await.len()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// An answer: status, headers (lowercase names), body.
struct Answer {
    status: u16,
    headers: BTreeMap<String, String>,
    body: String,
}

/// One request on a connection of its own, with `authorization` as that header if given.
fn call(rig: &Rig, method: &str, path: &str, authorization: Option<&str>, body: &str) -> Answer {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(rig.config.api_listen).unwrap();
    let auth = authorization
        .map(|a| format!("Authorization: {a}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap()[9..12].parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_string(),
    }
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_route_wants_the_token_and_only_the_right_one_gets_in() {
    let rig = Rig::start().await;
    let id = rig.ids[0].clone();
    let routes = [
        ("GET", "/dead-letters".to_string(), String::new()),
        ("GET", format!("/dead-letters/{id}"), String::new()),
        (
            "POST",
            "/dead-letters/replay".to_string(),
            r#"{"reason":"unknown_device"}"#.to_string(),
        ),
        ("GET", "/dead-letters?limit=5000".to_string(), String::new()),
        ("GET", "/no-such-path".to_string(), String::new()),
    ];
    let right = bearer(TOKEN);
    let refused = [
        (None, false),
        (Some(bearer(WRONG)), true),
        (Some(format!("Bearer {}", &TOKEN[..32])), true),
        (Some(format!("Basic {TOKEN}")), false),
        (Some("Bearer".to_string()), false),
    ];
    for (method, path, body) in &routes {
        for (auth, token_sent) in &refused {
            let a = call(&rig, method, path, auth.as_deref(), body);
            assert_eq!(a.status, 401, "{method} {path} with {auth:?}: {}", a.body);
            let challenge = &a.headers["www-authenticate"];
            assert!(challenge.starts_with("Bearer"), "{challenge}");
            assert_eq!(
                challenge.contains(r#"error="invalid_token""#),
                *token_sent,
                "{auth:?}: {challenge}"
            );
            assert!(
                !a.body.contains("dev-0") && !a.body.contains(&id),
                "nothing of the archive: {}",
                a.body
            );
        }
    }
    // The right token, in either case of the scheme.
    let listed = call(&rig, "GET", "/dead-letters", Some(&right), "");
    assert_eq!(listed.status, 200, "{}", listed.body);
    assert!(
        listed.body.contains(&rig.ids[0]) && listed.body.contains(&rig.ids[1]),
        "{}",
        listed.body
    );
    let lower = format!("bearer {TOKEN}");
    let shown = call(
        &rig,
        "GET",
        &format!("/dead-letters/{id}"),
        Some(&lower),
        "",
    );
    assert!(
        shown.status == 200 && shown.body.contains("payload of dev-0"),
        "{}",
        shown.body
    );
    let dry = call(
        &rig,
        "POST",
        "/dead-letters/replay",
        Some(&right),
        r#"{"reason":"unknown_device","dry_run":true}"#,
    );
    assert!(dry.status == 200 && dry.body.contains(&id), "{}", dry.body);
    let unknown = call(&rig, "GET", "/no-such-path", Some(&right), "");
    assert_eq!(unknown.status, 404);
    // The refused replays and the dry run put nothing back on Kafka.
    assert_eq!(rig.replayed_records(Duration::from_secs(2)).await, 0);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cli_sends_the_token_and_says_why_it_was_refused() {
    let rig = Rig::start().await;
    std::fs::write(rig.dir.join("wrong"), WRONG).unwrap();
    let cli = |env: &[(&str, &str)], args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_iotp-dlq"))
            .env_remove("IOTP_DLQ_TOKEN")
            .env_remove("IOTP_DLQ_TOKEN_FILE")
            .envs(env.iter().copied())
            .arg("--api")
            .arg(rig.config.api_listen.to_string())
            .args(args)
            .output()
            .unwrap()
    };
    let token_file = rig.dir.join("token").display().to_string();
    let out = cli(&[], &["--token-file", &token_file, "list"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(&rig.ids[0]),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cli(
        &[("IOTP_DLQ_TOKEN_FILE", &token_file)],
        &["show", &rig.ids[1]],
    );
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("dev-1"));
    let out = cli(
        &[("IOTP_DLQ_TOKEN", TOKEN)],
        &["replay", "--reason", "unknown_device", "--dry-run"],
    );
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains(&rig.ids[0]),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = cli(&[], &["list"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "no token, no listing");
    assert!(
        stderr.contains("HTTP 401") && stderr.contains("wants a bearer token"),
        "{stderr}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).is_empty());
    let wrong = rig.dir.join("wrong").display().to_string();
    let out = cli(&[], &["--token-file", &wrong, "list"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("HTTP 401")
            && stderr.contains("refused the token"),
        "{stderr}"
    );
    assert!(
        !stderr.contains(WRONG),
        "the token is not printed: {stderr}"
    );
    let out = cli(
        &[("IOTP_DLQ_TOKEN", TOKEN)],
        &["--token-file", &token_file, "list"],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("one way"),
        "{stderr}"
    );
    assert_eq!(rig.replayed_records(Duration::from_secs(1)).await, 0);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_misspelt_or_empty_replay_filter_is_refused_and_replays_nothing() {
    let rig = Rig::start().await;
    let auth = bearer(TOKEN);
    let refused = [
        (r#"{"reasn":"unknown_device"}"#, "reasn"),
        (r#"{"reason":"unknown_device","dry_rn":true}"#, "dry_rn"),
        (r#"{"ids":"not-a-list"}"#, "invalid type"),
        ("{}", "names no letters"),
        (r#"{"include_replayed":true}"#, "names no letters"),
        (
            r#"{"all":true,"reason":"unknown_device"}"#,
            "does not go with",
        ),
        ("{not json", "JSON"),
    ];
    for (body, says) in refused {
        let a = call(&rig, "POST", "/dead-letters/replay", Some(&auth), body);
        assert_eq!(a.status, 400, "{body}: {}", a.body);
        let error: serde_json::Value = serde_json::from_str(&a.body).unwrap();
        let message = error["error"].as_str().unwrap();
        assert!(message.contains(says), "{body}: {message}");
    }
    let a = call(
        &rig,
        "POST",
        "/dead-letters/replay",
        Some(&auth),
        r#"{"reasn":"x"}"#,
    );
    assert!(
        a.body.contains("dry_run") && a.body.contains("device_id"),
        "the fields are listed: {}",
        a.body
    );
    let a = call(
        &rig,
        "GET",
        "/dead-letters?reasn=unknown_device",
        Some(&auth),
        "",
    );
    assert!(a.status == 400 && a.body.contains("reasn"), "{}", a.body);

    assert_eq!(rig.replayed_records(Duration::from_secs(3)).await, 0);
    assert!(
        rig.archived().await.iter().all(|a| a.replayed_at.is_none()),
        "no letter marked replayed"
    );
    // The same filter spelt right replays both: the checks above could have seen them.
    let a = call(
        &rig,
        "POST",
        "/dead-letters/replay",
        Some(&auth),
        r#"{"reason":"unknown_device"}"#,
    );
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(rig.replayed_records(Duration::from_secs(30)).await, 2);
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_limit_over_the_maximum_is_refused_with_the_maximum() {
    let rig = Rig::start().await;
    let auth = bearer(TOKEN);
    let max = iotp_dlq_handler::MAX_LIMIT;
    for path in [
        format!("/dead-letters?limit={}", max + 1),
        "/dead-letters?limit=1000000".to_string(),
    ] {
        let a = call(&rig, "GET", &path, Some(&auth), "");
        assert_eq!(a.status, 400, "{path}: {}", a.body);
        assert!(a.body.contains(&format!("maximum of {max}")), "{}", a.body);
    }
    let body = format!(r#"{{"all":true,"limit":{},"dry_run":true}}"#, max + 1);
    let a = call(&rig, "POST", "/dead-letters/replay", Some(&auth), &body);
    assert!(a.status == 400 && a.body.contains("maximum"), "{}", a.body);

    let at_max = call(
        &rig,
        "GET",
        &format!("/dead-letters?limit={max}"),
        Some(&auth),
        "",
    );
    assert_eq!(at_max.status, 200, "{}", at_max.body);
    let listed: Vec<serde_json::Value> = serde_json::from_str(&at_max.body).unwrap();
    assert_eq!(listed.len(), 2);
    let one = call(&rig, "GET", "/dead-letters?limit=1", Some(&auth), "");
    let listed: Vec<serde_json::Value> = serde_json::from_str(&one.body).unwrap();
    assert_eq!(listed.len(), 1, "{}", one.body);
    let all = call(
        &rig,
        "POST",
        "/dead-letters/replay",
        Some(&auth),
        r#"{"all":true,"dry_run":true}"#,
    );
    assert!(
        all.status == 200 && all.body.contains(&rig.ids[1]),
        "{}",
        all.body
    );
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_failure_answers_an_error_id_and_none_of_its_text() {
    let rig = Rig::start().await;
    // Another connection takes the archive's table away: the service's next query fails with
    // SQLite's "no such table: dead_letters".
    let db = rusqlite::Connection::open(&rig.config.store.path).unwrap();
    db.execute_batch("ALTER TABLE dead_letters RENAME TO dead_letters_gone")
        .unwrap();
    let auth = bearer(TOKEN);
    let requests = [
        ("GET", "/dead-letters".to_string(), ""),
        ("GET", format!("/dead-letters/{}", rig.ids[0]), ""),
        (
            "POST",
            "/dead-letters/replay".to_string(),
            r#"{"reason":"unknown_device"}"#,
        ),
    ];
    let dir = rig.dir.display().to_string();
    for (method, path, body) in &requests {
        let a = call(&rig, method, path, Some(&auth), body);
        assert_eq!(a.status, 500, "{method} {path}: {}", a.body);
        let error: serde_json::Value = serde_json::from_str(&a.body).unwrap();
        let message = error["error"].as_str().unwrap();
        assert!(message.starts_with("internal error, id "), "{message}");
        for leak in [
            "no such table",
            "dead_letters",
            "sqlite",
            "store backend",
            dir.as_str(),
        ] {
            assert!(
                !a.body.contains(leak),
                "{method} {path} shows {leak:?}: {}",
                a.body
            );
        }
    }
    db.execute_batch("ALTER TABLE dead_letters_gone RENAME TO dead_letters")
        .unwrap();
    assert_eq!(rig.replayed_records(Duration::from_secs(1)).await, 0);
    rig.stop().await;
}

/// `iotp-dlq-handler` itself, started with the configuration in `env` (nothing else).
fn handler(env: &[(&str, &str)], check_only: bool) -> std::process::Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_iotp-dlq-handler"));
    if check_only {
        cmd.arg("--check-config");
    }
    cmd.env_clear().envs(env.iter().copied()).output().unwrap()
}

#[test]
fn the_service_refuses_an_api_off_loopback_without_a_token_and_a_bad_token_file() {
    let dir = std::env::temp_dir().join(unique("dlq-start-"));
    std::fs::create_dir_all(&dir).unwrap();
    let short = dir.join("short");
    std::fs::write(&short, "short-S3CRET\n").unwrap();
    let good = dir.join("good");
    std::fs::write(&good, TOKEN).unwrap();
    let (short, good) = (short.display().to_string(), good.display().to_string());

    // Refused at start, before anything is opened: exit 2, the reason named.
    let out = handler(&[("IOTP__API_LISTEN", "0.0.0.0:9200")], false);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("not a loopback address") && stderr.contains("api_token_file"),
        "{stderr}"
    );
    let out = handler(
        &[
            ("IOTP__API_LISTEN", "0.0.0.0:9200"),
            ("IOTP__API_TOKEN_FILE", &short),
        ],
        false,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("at least 32") && !stderr.contains("S3CRET"),
        "{stderr}"
    );
    let missing = dir.join("missing").display().to_string();
    let out = handler(&[("IOTP__API_TOKEN_FILE", &missing)], true);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(2) && stderr.contains(&missing),
        "{stderr}"
    );

    // Accepted: off loopback with a token (its path printed, never its contents), and
    // loopback without one (the default address).
    let out = handler(
        &[
            ("IOTP__API_LISTEN", "0.0.0.0:9200"),
            ("IOTP__API_TOKEN_FILE", &good),
        ],
        true,
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        printed.contains(&good) && !printed.contains(TOKEN),
        "{printed}"
    );
    let out = handler(&[], true);
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && printed.contains("api_listen = \"127.0.0.1:9200\""),
        "{printed}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn debug_of_the_config_hides_its_passwords() {
    let config = DlqConfig {
        amqp_uri: "amqp://iotp:amqp-S3CRET@rabbitmq:5672/%2f".into(),
        store: StoreConfig {
            mongodb_uri: Some("mongodb://iotp:mongo-S3CRET@mongodb:27017/iotp".into()),
            ..StoreConfig::default()
        },
        ..DlqConfig::default()
    };
    for printed in [format!("{config:?}"), format!("{config:#?}")] {
        assert!(!printed.contains("S3CRET"), "{printed}");
        assert!(
            printed.contains("iotp:***@rabbitmq:5672")
                && printed.contains("iotp:***@mongodb:27017"),
            "{printed}"
        );
    }
}
