//! TLS to the broker (`amqps://`): the connector built from the `[broker]`
//! TLS settings, and handshake failures turned into one line that names the
//! setting to fix.
//!
//! Verification is always on: the broker's certificate must chain to
//! `broker.tls_ca_file` (only those CAs) or, when it is empty, to the
//! system's trusted roots, and must name the host of `broker.url`.

use std::net::SocketAddr;
use std::sync::Arc;

use lapin::tcp::{AsyncTcpStream, RustlsConnector, RustlsConnectorConfig};
use lapin::uri::AMQPUri;
use lapin::{Connection, ConnectionProperties};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{AlertDescription, CertificateError};
use warren_core::config::{BrokerConfig, BrokerUrl};

use crate::ClientError;

/// Opens a connection over TLS to node `index` of `broker.url`, an
/// `amqps://` URI.
pub(crate) async fn connect(
    broker: &BrokerConfig,
    index: usize,
    props: ConnectionProperties,
) -> Result<Connection, ClientError> {
    let node = Node::of(broker, index);
    let uri: AMQPUri = node
        .url
        .expose()
        .parse()
        .map_err(|e: String| ClientError::Tls {
            setting: node.key.clone(),
            value: None,
            problem: format!("\"{}\" is not an AMQP URI: {e}", node.url.redacted()),
        })?;
    let host = uri.authority.host.clone();
    let connector = Arc::new(connector(broker)?);
    let runtime = lapin::runtime::default_runtime().map_err(|source| ClientError::Connect {
        url: node.url.redacted(),
        source,
    })?;
    let transport = async move |uri: AMQPUri, runtime| {
        let host = uri.authority.host.as_str();
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, uri.authority.port))
            .await?
            .collect();
        let plain = AsyncTcpStream::connect(&runtime, addrs).await?;
        Ok(plain.into_rustls(&connector, host).await?)
    };
    Connection::connector(uri, runtime, transport, props)
        .await
        .map_err(|source| explain(broker, &node, &host, source))
}

/// One node of `broker.url`: its URL and the key that names it.
struct Node<'a> {
    url: &'a BrokerUrl,
    key: String,
}

impl<'a> Node<'a> {
    fn of(broker: &'a BrokerConfig, index: usize) -> Node<'a> {
        Node {
            url: &broker.url.nodes()[index],
            key: broker.url.key(index),
        }
    }
}

/// The rustls connector for `broker`'s CA and client certificate.
fn connector(broker: &BrokerConfig) -> Result<RustlsConnector, ClientError> {
    let config = if broker.tls_ca_file.is_empty() {
        RustlsConnectorConfig::new_with_platform_verifier()
    } else {
        let cas = certificates("broker.tls_ca_file", &broker.tls_ca_file)?;
        RustlsConnectorConfig::default().with_parsable_certificates(cas)
    };
    let built = if broker.tls_client_cert.is_empty() {
        config.connector_with_no_client_auth()
    } else {
        let chain = certificates("broker.tls_client_cert", &broker.tls_client_cert)?;
        let key = read("broker.tls_client_key", &broker.tls_client_key)?;
        let key = PrivateKeyDer::from_pem_slice(&key).map_err(|e| {
            setting_error(
                "broker.tls_client_key",
                &broker.tls_client_key,
                format!("holds no usable private key ({e}): give the PEM file of the key"),
            )
        })?;
        config.connector_with_single_cert(chain, key)
    };
    built.map_err(|e| {
        let (key, path) = if broker.tls_client_cert.is_empty() {
            ("broker.tls_ca_file", &broker.tls_ca_file)
        } else {
            ("broker.tls_client_cert", &broker.tls_client_cert)
        };
        setting_error(key, path, format!("cannot be used for TLS: {e}"))
    })
}

/// The bytes of the file a TLS setting names.
fn read(key: &str, path: &str) -> Result<Vec<u8>, ClientError> {
    std::fs::read(path).map_err(|e| setting_error(key, path, format!("cannot be read: {e}")))
}

/// Every certificate of the PEM file a TLS setting names (at least one).
fn certificates(key: &str, path: &str) -> Result<Vec<CertificateDer<'static>>, ClientError> {
    let pem = read(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| setting_error(key, path, format!("is not a PEM file: {e}")))?;
    if certs.is_empty() {
        return Err(setting_error(
            key,
            path,
            "holds no certificate: give a PEM file with -----BEGIN CERTIFICATE----- blocks".into(),
        ));
    }
    Ok(certs)
}

fn setting_error(key: &str, path: &str, problem: String) -> ClientError {
    ClientError::Tls {
        setting: key.into(),
        value: (!path.is_empty()).then(|| path.into()),
        problem,
    }
}

/// A failed TLS connection as the setting that can fix it, when the TLS
/// library says why; otherwise the plain connection error.
fn explain(broker: &BrokerConfig, node: &Node, host: &str, source: lapin::Error) -> ClientError {
    let url = node.url.redacted();
    let Some(cause) = rustls_cause(&source) else {
        return ClientError::Connect { url, source };
    };
    let set = |value: &str| (!value.is_empty()).then(|| value.to_owned());
    let (setting, value, problem) = match cause {
        rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        ) => (
            node.key.as_str(),
            None,
            format!(
                "the certificate of the broker at {url} is not valid for its host \"{host}\" \
                 ({cause}): connect by a name the certificate holds, or have it reissued \
                 for this one"
            ),
        ),
        rustls::Error::InvalidCertificate(_) if broker.tls_ca_file.is_empty() => (
            "broker.tls_ca_file",
            None,
            format!(
                "not set, and the system's trusted roots do not accept the certificate of \
                 the broker at {url} ({cause}): set it to the PEM file of the CA that \
                 issued that certificate"
            ),
        ),
        rustls::Error::InvalidCertificate(_) => (
            "broker.tls_ca_file",
            set(&broker.tls_ca_file),
            format!(
                "the certificate of the broker at {url} is not accepted by these CAs \
                 ({cause}): set it to the PEM file of the CA that issued that certificate"
            ),
        ),
        rustls::Error::AlertReceived(
            AlertDescription::CertificateRequired | AlertDescription::HandshakeFailure,
        ) if broker.tls_client_cert.is_empty() => (
            "broker.tls_client_cert",
            None,
            format!(
                "not set, and the broker at {url} requires a client certificate ({cause}): \
                 set it and broker.tls_client_key"
            ),
        ),
        rustls::Error::AlertReceived(
            AlertDescription::BadCertificate
            | AlertDescription::UnknownCA
            | AlertDescription::CertificateExpired
            | AlertDescription::CertificateUnknown
            | AlertDescription::UnsupportedCertificate
            | AlertDescription::AccessDenied,
        ) if !broker.tls_client_cert.is_empty() => (
            "broker.tls_client_cert",
            set(&broker.tls_client_cert),
            format!(
                "the broker at {url} refused this client certificate ({cause}): use one \
                 issued by a CA the broker trusts"
            ),
        ),
        _ => return ClientError::Connect { url, source },
    };
    ClientError::Tls {
        setting: setting.into(),
        value,
        problem,
    }
}

/// The TLS library's error inside a connection error, if there is one.
fn rustls_cause(error: &lapin::Error) -> Option<&rustls::Error> {
    let lapin::ErrorKind::IOError(io) = error.kind() else {
        return None;
    };
    let mut inner: &(dyn std::error::Error + 'static) = io.get_ref()?;
    loop {
        if let Some(tls) = inner.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(io) = inner.downcast_ref::<std::io::Error>() {
            inner = io.get_ref()?;
            continue;
        }
        inner = inner.source()?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use warren_core::config::BrokerUrls;

    fn broker(ca: &str, cert: &str) -> BrokerConfig {
        BrokerConfig {
            url: BrokerUrls::new("amqps://u:secret@rabbit.internal:5671/%2f"),
            tls_ca_file: ca.into(),
            tls_client_cert: cert.into(),
            tls_client_key: if cert.is_empty() { "" } else { "/k.pem" }.into(),
            ..BrokerConfig::default()
        }
    }

    /// What `connect` reports when the handshake failed with `cause`.
    fn explained(b: &BrokerConfig, cause: rustls::Error) -> String {
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, cause);
        explain(
            b,
            &Node::of(b, 0),
            "rabbit.internal",
            lapin::Error::from(io),
        )
        .to_string()
    }

    #[test]
    fn handshake_failures_name_the_setting_to_fix() {
        let b = broker("/etc/ca.pem", "");
        let unknown = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        assert_eq!(
            explained(&b, unknown.clone()),
            "broker.tls_ca_file = \"/etc/ca.pem\": the certificate of the broker at \
             amqps://u:***@rabbit.internal:5671/%2f is not accepted by these CAs (invalid peer \
             certificate: UnknownIssuer): set it to the PEM file of the CA that issued that \
             certificate"
        );
        assert!(explained(&broker("", ""), unknown).starts_with(
            "broker.tls_ca_file: not set, and the system's trusted roots do not accept"
        ));
        let name = rustls::Error::InvalidCertificate(CertificateError::NotValidForName);
        assert!(explained(&b, name).starts_with(
            "broker.url: the certificate of the broker at amqps://u:***@rabbit.internal:5671/%2f \
             is not valid for its host \"rabbit.internal\""
        ));
        let required = rustls::Error::AlertReceived(AlertDescription::CertificateRequired);
        assert!(explained(&b, required).starts_with(
            "broker.tls_client_cert: not set, and the broker at \
             amqps://u:***@rabbit.internal:5671/%2f requires a client certificate"
        ));
        let refused = rustls::Error::AlertReceived(AlertDescription::UnknownCA);
        assert!(explained(&broker("", "/c.pem"), refused).starts_with(
            "broker.tls_client_cert = \"/c.pem\": the broker at \
             amqps://u:***@rabbit.internal:5671/%2f refused this client certificate"
        ));
        // Anything else stays a plain connection error, password hidden.
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        let other = explain(
            &b,
            &Node::of(&b, 0),
            "rabbit.internal",
            lapin::Error::from(reset),
        );
        assert!(!other.is_setting_problem());
        assert!(other
            .to_string()
            .starts_with("broker at amqps://u:***@rabbit.internal:5671/%2f: "));
    }

    #[test]
    fn unusable_files_name_their_setting() {
        let err = connector(&broker("/nonexistent/ca.pem", "")).unwrap_err();
        assert!(err.is_setting_problem());
        assert!(
            err.to_string()
                .starts_with("broker.tls_ca_file = \"/nonexistent/ca.pem\": cannot be read: "),
            "{err}"
        );
        let dir = std::env::temp_dir().join(format!("warren-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let text = dir.join("notes.txt");
        std::fs::write(&text, "no PEM here\n").unwrap();
        let text = text.to_str().unwrap();
        let err = connector(&broker(text, "")).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "broker.tls_ca_file = \"{text}\": holds no certificate: give a PEM file with \
                 -----BEGIN CERTIFICATE----- blocks"
            )
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
