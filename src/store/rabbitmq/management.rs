//! The figure AMQP does not tell: how many messages consumers hold unacknowledged,
//! read from the broker's management API (plugin `rabbitmq_management`) when
//! [`RabbitConfig::management_url`](super::RabbitConfig::management_url) is set.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use lapin::uri::AMQPUri;

use crate::Error;

/// The largest answer read: one queue's JSON is a few kilobytes.
const MAX_ANSWER: usize = 1 << 20;

/// Plain http, and https too with `rabbitmq-tls`.
#[cfg(feature = "rabbitmq-tls")]
type Connector = hyper_rustls::HttpsConnector<HttpConnector>;
#[cfg(not(feature = "rabbitmq-tls"))]
type Connector = HttpConnector;

/// Asks the management API about one queue.
pub(super) struct Management {
    client: Client<Connector, Empty<Bytes>>,
    /// `<base>/api/queues/<vhost>/<queue>`.
    queue_uri: http::Uri,
    authorization: http::HeaderValue,
}

impl Management {
    /// The API at `base` (`http://[user:pass@]host:port[/prefix]`) for `queue` in
    /// the virtual host of `amqp_url`, whose credentials are used unless `base`
    /// carries its own.
    pub(super) fn new(base: &str, amqp_url: &str, queue: &str) -> Result<Self, String> {
        let amqp: AMQPUri = amqp_url.parse()?;
        let (queue_uri, credentials) = queue_uri(base, &amqp.vhost, queue)?;
        let userinfo = amqp.authority.userinfo;
        let (user, password) = credentials.unwrap_or((userinfo.username, userinfo.password));
        let token = STANDARD.encode(format!("{user}:{password}"));
        let mut authorization = http::HeaderValue::try_from(format!("Basic {token}"))
            .map_err(|_| "the credentials cannot be sent in a header".to_owned())?;
        authorization.set_sensitive(true);
        let https = queue_uri.scheme() == Some(&http::uri::Scheme::HTTPS);
        Ok(Management {
            client: Client::builder(TokioExecutor::new()).build(connector(https)?),
            queue_uri,
            authorization,
        })
    }

    /// The queue's messages, and of them those handed to consumers and not yet
    /// acknowledged, as last sampled: `None` while the broker has not sampled the
    /// queue yet (its statistics lag by `collect_statistics_interval`, 5 s by
    /// default).
    pub(super) async fn sample(&self) -> Result<Option<Sample>, Error> {
        let failed = |reason: String| {
            Error::store_unavailable("cannot read the unacknowledged count", reason)
        };
        let request = http::Request::get(&self.queue_uri)
            .header(http::header::AUTHORIZATION, self.authorization.clone())
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::new())
            .map_err(|e| failed(e.to_string()))?;
        // The client's error as the source: `Error::report` then shows its causes
        // (refused, a certificate not trusted), where its own text says only
        // "client error (Connect)".
        let answer = self.client.request(request).await.map_err(|e| {
            let context = format!(
                "cannot read the unacknowledged count from the management API at {}",
                self.queue_uri
            );
            Error::store_unavailable(context, e)
        })?;
        let status = answer.status();
        let body = Limited::new(answer.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| failed(format!("the management API's answer: {e}")))?
            .to_bytes();
        if !status.is_success() {
            return Err(failed(format!(
                "the management API answered {status} for {}",
                self.queue_uri
            )));
        }
        sample_in(&body).map_err(failed)
    }
}

/// The connector for an https API: trusting the system's root certificates
/// (`SSL_CERT_FILE` and `SSL_CERT_DIR` when set), as `amqps://` does.
#[cfg(feature = "rabbitmq-tls")]
fn connector(https: bool) -> Result<Connector, String> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = hyper_rustls::HttpsConnectorBuilder::new();
    let builder = if https {
        builder
            .with_provider_and_native_roots(provider)
            .map_err(|e| format!("no root certificate to trust the management API's: {e}"))?
    } else {
        // An http API needs no certificates: none are loaded.
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        builder.with_tls_config(config)
    };
    Ok(builder.https_or_http().enable_http1().build())
}

#[cfg(not(feature = "rabbitmq-tls"))]
fn connector(_https: bool) -> Result<Connector, String> {
    Ok(HttpConnector::new())
}

/// Whether `base` can be the management API's URL: why not when it cannot.
pub(crate) fn check_url(base: &str) -> Result<(), String> {
    queue_uri(base, "/", "q").map(|_| ())
}

/// What a management URL looks like, in errors.
const EXPECTED: &str = if cfg!(feature = "rabbitmq-tls") {
    "http[s]://[user:pass@]host:15672"
} else {
    "http://[user:pass@]host:15672"
};

/// The queue's address under `base`, and the credentials `base` carries.
#[allow(clippy::type_complexity)]
fn queue_uri(
    base: &str,
    vhost: &str,
    queue: &str,
) -> Result<(http::Uri, Option<(String, String)>), String> {
    let wrong = |why: &str| format!("the management URL {base:?} {why}: expected {EXPECTED}");
    let mut url =
        url::Url::parse(base.trim()).map_err(|e| wrong(&format!("is not a URL ({e})")))?;
    match url.scheme() {
        "http" => {}
        "https" if cfg!(feature = "rabbitmq-tls") => {}
        "https" => return Err(wrong("is https, which needs the feature rabbitmq-tls")),
        _ => return Err(wrong("is not http")),
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(wrong("names no host"));
    }
    let decode = |part: &str| {
        percent_encoding::percent_decode_str(part)
            .decode_utf8()
            .map(|text| text.into_owned())
            .map_err(|_| wrong("has credentials that are not UTF-8"))
    };
    let credentials = if url.username().is_empty() {
        None
    } else {
        Some((
            decode(url.username())?,
            decode(url.password().unwrap_or(""))?,
        ))
    };
    // The credentials travel in the Authorization header, never in the address.
    let _ = url.set_username("");
    let _ = url.set_password(None);
    url.set_query(None);
    url.set_fragment(None);
    url.path_segments_mut()
        .map_err(|()| wrong("cannot have a path"))?
        .pop_if_empty()
        .extend(["api", "queues", vhost, queue]);
    let uri = url
        .as_str()
        .parse()
        .map_err(|e| wrong(&format!("is not a URL ({e})")))?;
    Ok((uri, credentials))
}

/// One sample of a queue's counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Sample {
    /// Ready and unacknowledged.
    pub(super) messages: u64,
    pub(super) unacknowledged: u64,
}

/// `messages` and `messages_unacknowledged` in the management API's JSON for a
/// queue.
fn sample_in(body: &[u8]) -> Result<Option<Sample>, String> {
    let queue: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| format!("the management API's answer is not JSON ({e})"))?;
    let count = |field: &str| match queue.get(field) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(count) => count
            .as_u64()
            .map(Some)
            .ok_or_else(|| format!("the management API's {field} is not a count: {count}")),
    };
    Ok(
        match (count("messages")?, count("messages_unacknowledged")?) {
            (Some(messages), Some(unacknowledged)) => Some(Sample {
                messages,
                unacknowledged,
            }),
            _ => None,
        },
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn the_queue_is_addressed_with_its_vhost_and_name_encoded() {
        let (uri, credentials) =
            queue_uri("http://127.0.0.1:15672", "/", "comapi-webhook.events").unwrap();
        assert_eq!(
            uri.to_string(),
            "http://127.0.0.1:15672/api/queues/%2F/comapi-webhook.events"
        );
        assert_eq!(credentials, None);
        let (uri, credentials) =
            queue_uri("http://ops:p%40ss@mq.local:8080/rabbit/", "prod", "a b").unwrap();
        assert_eq!(
            uri.to_string(),
            "http://mq.local:8080/rabbit/api/queues/prod/a%20b"
        );
        assert_eq!(credentials, Some(("ops".into(), "p@ss".into())));
    }

    #[test]
    fn a_wrong_management_url_says_what_is_wrong() {
        for (base, says) in [
            ("127.0.0.1:15672", "is not a URL"),
            ("mq.local:15672", "is not http"),
            ("amqp://mq:5672", "is not http"),
            ("not a url", "is not a URL"),
            ("", "is not a URL"),
        ] {
            let error = queue_uri(base, "/", "q").unwrap_err();
            assert!(error.contains(says), "{base:?}: {error}");
            assert!(error.contains("expected http"), "{error}");
        }
    }

    #[cfg(not(feature = "rabbitmq-tls"))]
    #[test]
    fn an_https_management_url_names_the_feature_it_needs() {
        let error = queue_uri("https://mq:15671", "/", "q").unwrap_err();
        assert!(error.contains("needs the feature rabbitmq-tls"), "{error}");
    }

    #[cfg(feature = "rabbitmq-tls")]
    #[test]
    fn an_https_management_url_is_addressed_like_an_http_one() {
        let (uri, _) = queue_uri("https://mq:15671/", "/", "q").unwrap();
        assert_eq!(uri.to_string(), "https://mq:15671/api/queues/%2F/q");
    }

    #[test]
    fn the_counts_are_read_and_a_queue_not_sampled_yet_has_none() {
        let sampled = br#"{"name":"q","messages":7,"messages_unacknowledged":3}"#;
        let sample = Sample {
            messages: 7,
            unacknowledged: 3,
        };
        assert_eq!(sample_in(sampled), Ok(Some(sample)));
        assert_eq!(sample_in(br#"{"name":"q"}"#), Ok(None));
        assert_eq!(sample_in(br#"{"messages":null}"#), Ok(None));
        let wrong = sample_in(br#"{"messages":1,"messages_unacknowledged":"x"}"#);
        assert!(
            wrong
                .unwrap_err()
                .contains("messages_unacknowledged is not a count")
        );
        assert!(sample_in(b"<html>").unwrap_err().contains("not JSON"));
    }

    #[test]
    fn the_credentials_come_from_the_amqp_url_unless_the_management_url_has_its_own() {
        let amqp = "amqp://guest:s%3Acret@127.0.0.1:5672/%2f";
        let management = Management::new("http://127.0.0.1:15672", amqp, "q").unwrap();
        let basic = |pair: &str| format!("Basic {}", STANDARD.encode(pair));
        assert_eq!(management.authorization, basic("guest:s:cret").as_str());
        assert!(management.authorization.is_sensitive());
        let management = Management::new("http://ops:pw@127.0.0.1:15672", amqp, "q").unwrap();
        assert_eq!(management.authorization, basic("ops:pw").as_str());
        assert_eq!(
            management.queue_uri.to_string(),
            "http://127.0.0.1:15672/api/queues/%2F/q"
        );
    }
}
