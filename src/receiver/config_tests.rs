//! `ReceiverConfig` from a map of variables: defaults, each variable, each error.
#![allow(clippy::panic)]

use super::*;

const SECRET: &str = "the-current-secret-0123456789";

fn config(vars: &[(&str, &str)]) -> Result<ReceiverConfig, String> {
    let vars: Vec<(String, String)> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    ReceiverConfig::from_lookup(&|name| {
        vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    })
    .map_err(|e| e.to_string())
}

#[test]
fn defaults_and_each_variable() {
    let defaults = config(&[("COMAPI_WEBHOOK_SECRET", SECRET)]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(defaults.addr, SocketAddr::from(([127, 0, 0, 1], 8080)));
    assert_eq!(defaults.max_body_bytes, DEFAULT_MAX_BODY_BYTES);
    assert!(defaults.worker && defaults.redis.is_none() && defaults.spool.remove_processed);
    let set = config(&[
        (
            "COMAPI_WEBHOOK_SECRET",
            &format!("{SECRET}, the-previous-secret-0123"),
        ),
        ("PORT", "0"),
        ("BIND", "0.0.0.0"),
        ("COMAPI_SPOOL_DIR", "/var/spool/comapi"),
        ("COMAPI_SPOOL_KEEP", "yes"),
        ("COMAPI_MAX_BODY_BYTES", "1000"),
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(set.addr, SocketAddr::from(([0, 0, 0, 0], 0)));
    assert_eq!(set.spool.dir, PathBuf::from("/var/spool/comapi"));
    assert!(!set.spool.remove_processed);
    assert_eq!(set.max_body_bytes, 1000);
    assert_eq!(defaults.worker_config.retry, RetryPolicy::default());
    assert_eq!(defaults.metrics_token, None);
    let tuned = config(&[
        ("COMAPI_WEBHOOK_SECRET", SECRET),
        ("COMAPI_RETRY_ATTEMPTS", "2"),
        ("COMAPI_RETRY_FIRST_DELAY", "100ms"),
        ("COMAPI_RETRY_MAX_DELAY", "1s"),
        ("COMAPI_METRICS_TOKEN", " a-token "),
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        tuned.worker_config.retry,
        RetryPolicy::new(Duration::from_millis(100), Duration::from_secs(1), 2)
    );
    assert_eq!(tuned.metrics_token.as_deref(), Some("a-token"));
    // A first delay over the default longest one raises the longest one with it.
    let slow = config(&[
        ("COMAPI_WEBHOOK_SECRET", SECRET),
        ("COMAPI_RETRY_FIRST_DELAY", "5m"),
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(slow.worker_config.retry.max_delay, Duration::from_secs(300));
}

#[test]
fn each_error_names_the_variable_and_never_the_secret() {
    let cases: [(&[(&str, &str)], &str); 15] = [
        (&[], "COMAPI_WEBHOOK_SECRET is required"),
        (
            &[("COMAPI_WEBHOOK_SECRET", "short")],
            "COMAPI_WEBHOOK_SECRET: entry 1 of 1 is 5 bytes; Comapi requires at least 16 bytes",
        ),
        (
            &[("COMAPI_WEBHOOK_SECRET", "the-current-secret-0123456789, ,x")],
            "COMAPI_WEBHOOK_SECRET: entry 2 of 3 is empty",
        ),
        (
            &[("COMAPI_WEBHOOK_SECRET", SECRET), ("PORT", "http")],
            "PORT must be a port number",
        ),
        (
            &[("COMAPI_WEBHOOK_SECRET", SECRET), ("BIND", "localhost")],
            "BIND must be an IP address",
        ),
        (
            &[
                ("COMAPI_WEBHOOK_SECRET", SECRET),
                ("COMAPI_SPOOL_KEEP", "sometimes"),
            ],
            "COMAPI_SPOOL_KEEP must be true or false",
        ),
        (
            &[
                ("COMAPI_WEBHOOK_SECRET", SECRET),
                ("COMAPI_MAX_BODY_BYTES", "0"),
            ],
            "COMAPI_MAX_BODY_BYTES must be a positive number",
        ),
        (
            &[
                ("COMAPI_WEBHOOK_SECRET", SECRET),
                ("COMAPI_WORKER", "maybe"),
            ],
            "COMAPI_WORKER must be true or false",
        ),
        (
            &[("COMAPI_WEBHOOK_SECRET", SECRET), ("COMAPI_LEASE", "abc")],
            "COMAPI_LEASE must be a duration such as 1m, not \"abc\"",
        ),
        (
            &[("COMAPI_WEBHOOK_SECRET", SECRET), ("COMAPI_LEASE", "1ms")],
            "COMAPI_LEASE must be at least 1s (a worker renews what it holds every third of it), not 1ms",
        ),
        (
            &[
                ("COMAPI_WEBHOOK_SECRET", SECRET),
                ("COMAPI_MAX_BODY_BYTES", "2000"),
                ("COMAPI_BODY_BUDGET_BYTES", "1000"),
            ],
            "COMAPI_BODY_BUDGET_BYTES (1000) must be at least COMAPI_MAX_BODY_BYTES (2000)",
        ),
        (
            &[
                ("COMAPI_WEBHOOK_SECRET", SECRET),
                ("COMAPI_RETRY_ATTEMPTS", "0"),
            ],
            "COMAPI_RETRY_ATTEMPTS must be from 1 (no retry) to 1000, not \"0\"",
        ),
        (
            &[
                ("COMAPI_WEBHOOK_SECRET", SECRET),
                ("COMAPI_CONCURRENCY", "100000"),
            ],
            "COMAPI_CONCURRENCY must be from 1 to 65536, not \"100000\"",
        ),
        (
            &[
                ("COMAPI_WEBHOOK_SECRET", SECRET),
                ("COMAPI_REDIS_URL", "127.0.0.1:6379"),
            ],
            "COMAPI_REDIS_URL must be a Redis URL: redis://[[user]:password@]host:port/[db]",
        ),
        (
            &[
                ("COMAPI_WEBHOOK_SECRET", SECRET),
                ("COMAPI_RETRY_FIRST_DELAY", "10s"),
                ("COMAPI_RETRY_MAX_DELAY", "1s"),
            ],
            "COMAPI_RETRY_MAX_DELAY (1s) must not be shorter than COMAPI_RETRY_FIRST_DELAY (10s)",
        ),
    ];
    for (vars, message) in cases {
        let error = config(vars).err().unwrap_or_default();
        assert!(error.starts_with(message), "{vars:?}: {error}");
        assert!(!error.contains("0123456789"), "{error}");
    }
}

#[cfg(feature = "redis")]
#[test]
fn redis_turns_the_worker_off_unless_asked() {
    let redis = config(&[
        ("COMAPI_WEBHOOK_SECRET", SECRET),
        ("COMAPI_REDIS_URL", "redis://127.0.0.1:6379/"),
        ("COMAPI_LEASE", "2s"),
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(!redis.worker);
    let settings = redis.redis.unwrap_or_else(|| panic!("no Redis"));
    assert_eq!(
        (settings.key_prefix.as_str(), settings.lease),
        (crate::receiver::DEFAULT_KEY_PREFIX, Duration::from_secs(2))
    );
    let error = config(&[
        ("COMAPI_WEBHOOK_SECRET", SECRET),
        ("COMAPI_REDIS_URL", "redis://x/"),
        ("COMAPI_LEASE", "soon"),
    ]);
    assert!(
        error
            .err()
            .unwrap_or_default()
            .starts_with("COMAPI_LEASE must be a duration")
    );
}

#[test]
fn redis_and_rabbitmq_at_once_is_refused_naming_both() {
    let error = config(&[
        ("COMAPI_WEBHOOK_SECRET", SECRET),
        ("COMAPI_REDIS_URL", "redis://127.0.0.1:6379/"),
        ("COMAPI_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
    ])
    .err()
    .unwrap_or_default();
    assert!(
        error.contains("COMAPI_REDIS_URL") && error.contains("COMAPI_AMQP_URL"),
        "{error}"
    );
    assert_eq!(error.lines().count(), 1, "{error}");
}

#[cfg(feature = "rabbitmq")]
#[test]
fn rabbitmq_turns_the_worker_off_unless_asked_and_names_its_queue() {
    let amqp = config(&[
        ("COMAPI_WEBHOOK_SECRET", SECRET),
        ("COMAPI_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
        ("COMAPI_AMQP_QUEUE", "my.events"),
    ])
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(!amqp.worker);
    let settings = amqp.amqp.unwrap_or_else(|| panic!("no RabbitMQ"));
    assert_eq!(settings.queue, "my.events");
    assert_eq!(settings.management_url, None);
    assert_eq!(settings.rabbit_config().management_url, None);
    let wrong = config(&[
        ("COMAPI_WEBHOOK_SECRET", SECRET),
        ("COMAPI_AMQP_URL", "rabbit://host"),
    ]);
    assert!(
        wrong
            .err()
            .unwrap_or_default()
            .starts_with("COMAPI_AMQP_URL must be amqp://")
    );
}

#[cfg(feature = "rabbitmq")]
#[test]
fn the_management_url_is_checked_at_start() {
    let with = |management: &str| {
        config(&[
            ("COMAPI_WEBHOOK_SECRET", SECRET),
            ("COMAPI_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
            ("COMAPI_AMQP_MANAGEMENT_URL", management),
        ])
    };
    let settings = with(" http://127.0.0.1:15672 ")
        .unwrap_or_else(|e| panic!("{e}"))
        .amqp
        .unwrap_or_else(|| panic!("no RabbitMQ"));
    let url = Some("http://127.0.0.1:15672".to_owned());
    assert_eq!(settings.rabbit_config().management_url, url);
    let error = with("ftp://mq:15671").err().unwrap_or_default();
    assert!(
        error.starts_with(
            "COMAPI_AMQP_MANAGEMENT_URL: the management URL \"ftp://mq:15671\" is not http"
        ),
        "{error}"
    );
    // https is built in with rabbitmq-tls, as amqps:// is.
    let https = with("https://mq:15671");
    if cfg!(feature = "rabbitmq-tls") {
        let settings = https.unwrap_or_else(|e| panic!("{e}"));
        assert!(settings.amqp.is_some());
    } else {
        let error = https.err().unwrap_or_default();
        assert!(error.contains("needs the feature rabbitmq-tls"), "{error}");
    }
}

#[cfg(feature = "rabbitmq")]
#[test]
fn amqps_needs_the_tls_feature() {
    let settings = config(&[
        ("COMAPI_WEBHOOK_SECRET", SECRET),
        ("COMAPI_AMQP_URL", "amqps://guest:guest@mq.example:5671/%2f"),
    ]);
    if cfg!(feature = "rabbitmq-tls") {
        let amqp = settings.unwrap_or_else(|e| panic!("{e}")).amqp;
        assert_eq!(
            amqp.map(|a| a.url).as_deref(),
            Some("amqps://guest:guest@mq.example:5671/%2f")
        );
    } else {
        let error = settings.err().unwrap_or_default();
        assert!(
            error.contains("built without TLS") && error.contains("rabbitmq-tls"),
            "{error}"
        );
    }
}

#[test]
fn the_gate_s_redis_is_for_rabbitmq_workers_only() {
    let error = config(&[
        ("COMAPI_WEBHOOK_SECRET", SECRET),
        ("COMAPI_GATE_REDIS_URL", "redis://127.0.0.1:6379/"),
    ])
    .err()
    .unwrap_or_default();
    assert!(
        error.starts_with("COMAPI_GATE_REDIS_URL is for the workers of a RabbitMQ queue"),
        "{error}"
    );
}

#[cfg(feature = "rabbitmq")]
#[test]
fn rabbitmq_workers_share_a_gate_in_the_redis_of_comapi_gate_redis_url() {
    let settings = config(&[
        ("COMAPI_WEBHOOK_SECRET", SECRET),
        ("COMAPI_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
        ("COMAPI_GATE_REDIS_URL", " redis://127.0.0.1:6379/ "),
        ("COMAPI_REDIS_PREFIX", "shop:"),
        ("COMAPI_LEASE", "90s"),
    ]);
    if !cfg!(feature = "redis") {
        let error = settings.err().unwrap_or_default();
        assert!(
            error.starts_with(
                "COMAPI_GATE_REDIS_URL is set, but this binary was built without Redis"
            ),
            "{error}"
        );
        return;
    }
    let amqp = settings
        .unwrap_or_else(|e| panic!("{e}"))
        .amqp
        .unwrap_or_else(|| panic!("no RabbitMQ"));
    let gate = amqp.gate.unwrap_or_else(|| panic!("no gate"));
    assert_eq!(gate.url, "redis://127.0.0.1:6379/");
    assert_eq!(gate.key_prefix, "shop:");
    assert_eq!(gate.lease, std::time::Duration::from_secs(90));
    assert_eq!(gate.variable(), "COMAPI_GATE_REDIS_URL");
}

#[test]
fn a_store_this_build_lacks_names_the_features_to_build_with() {
    for (variable, url, feature, lacking) in [
        (
            "COMAPI_REDIS_URL",
            "redis://127.0.0.1:6379/",
            "redis",
            !cfg!(feature = "redis"),
        ),
        (
            "COMAPI_AMQP_URL",
            "amqp://guest:guest@127.0.0.1:5672/%2f",
            "rabbitmq",
            !cfg!(feature = "rabbitmq"),
        ),
    ] {
        let settings = config(&[("COMAPI_WEBHOOK_SECRET", SECRET), (variable, url)]);
        if lacking {
            let error = settings.err().unwrap_or_default();
            assert!(
                error.ends_with(&format!("build it with --features binaries,{feature}")),
                "{error}"
            );
        } else {
            assert!(settings.is_ok(), "{settings:?}");
        }
    }
}
