//! Transport security, the same for every component: a server serves TLS
//! when given a certificate and key, and refuses callers without a client
//! certificate from `client_ca_file` when one is named (mutual TLS, so inside
//! a cluster nothing but the gateway reaches a service). Clients speak TLS to
//! `https://` URLs, presenting their own certificate when configured.
//! Plain text stays the default for `madtech up` on loopback.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

use crate::config::ConfigError;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid URL {url}: {reason}")]
    Url { url: String, reason: String },
    #[error("{path} is not usable PEM: {reason}")]
    Pem { path: PathBuf, reason: String },
}

/// Several crates in the build bring rustls with different cryptography
/// back ends, so rustls cannot pick one itself: choose aws-lc-rs (the one the
/// JWT verification uses too), once per process, before any TLS is set up.
fn choose_crypto_provider() {
    static CHOSEN: std::sync::Once = std::sync::Once::new();
    CHOSEN.call_once(|| {
        // Fails only when another provider was installed first, which is
        // then the one in use; nothing to do.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    });
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// TLS for a server.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerTls {
    /// PEM certificate chain; with `key_file`, the server speaks TLS.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// PEM CA: callers must present a certificate it signed.
    pub client_ca_file: Option<PathBuf>,
}

impl ServerTls {
    pub fn validate(&self, component: &str) -> Result<(), ConfigError> {
        match (&self.cert_file, &self.key_file, &self.client_ca_file) {
            (Some(_), Some(_), _) | (None, None, None) => Ok(()),
            (None, None, Some(_)) => Err(ConfigError::Invalid(format!(
                "{component}.tls.client_ca_file needs cert_file and key_file"
            ))),
            _ => Err(ConfigError::Invalid(format!(
                "{component}.tls needs both cert_file and key_file"
            ))),
        }
    }

    /// The tonic configuration, or `None` for plain text.
    pub fn load(&self) -> Result<Option<ServerTlsConfig>, TlsError> {
        let (Some(cert), Some(key)) = (&self.cert_file, &self.key_file) else {
            return Ok(None);
        };
        choose_crypto_provider();
        let mut config =
            ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?));
        if let Some(ca) = &self.client_ca_file {
            config = config.client_ca_root(Certificate::from_pem(read(ca)?));
        }
        Ok(Some(config))
    }
}

/// TLS for a client of another component.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientTls {
    /// PEM CA that signed the server's certificate.
    pub ca_file: Option<PathBuf>,
    /// PEM certificate and key presented to servers that require one.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The name the server's certificate must carry, when not the URL's host.
    pub domain: Option<String>,
}

impl ClientTls {
    pub fn validate(&self, field: &str) -> Result<(), ConfigError> {
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Err(ConfigError::Invalid(format!(
                "{field} needs both cert_file and key_file"
            )));
        }
        Ok(())
    }

    /// Whether `url` (the setting `url_field`) can be called with these
    /// settings (`field`): an `http://` or `https://` URL, and for
    /// `https://` the CA that signed the server's certificate, since no
    /// system roots are trusted.
    pub fn validate_url(&self, field: &str, url_field: &str, url: &str) -> Result<(), ConfigError> {
        let secure = url.starts_with("https://");
        if !(secure || url.starts_with("http://")) {
            return Err(ConfigError::Invalid(format!(
                "{url_field} must be an http:// or https:// URL"
            )));
        }
        if secure && self.ca_file.is_none() {
            return Err(ConfigError::Invalid(format!(
                "{url_field} is https://, so {field}.ca_file must name the CA that signed its certificate"
            )));
        }
        Ok(())
    }

    /// A lazily connecting endpoint for `url`; TLS when the URL is `https://`.
    pub fn endpoint(&self, url: &str) -> Result<Endpoint, TlsError> {
        let endpoint = Endpoint::from_shared(url.to_string()).map_err(|err| TlsError::Url {
            url: url.to_string(),
            reason: err.to_string(),
        })?;
        if !url.starts_with("https://") {
            return Ok(endpoint);
        }
        choose_crypto_provider();
        let mut config = ClientTlsConfig::new();
        if let Some(ca) = &self.ca_file {
            config = config.ca_certificate(Certificate::from_pem(read(ca)?));
        }
        if let (Some(cert), Some(key)) = (&self.cert_file, &self.key_file) {
            config = config.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain.clone());
        }
        endpoint.tls_config(config).map_err(|err| TlsError::Url {
            url: url.to_string(),
            reason: err.to_string(),
        })
    }

    /// The same settings as a rustls client configuration, for a client
    /// that drives its connections itself (`crate::upstream`):
    /// servers are trusted only when `ca_file` signed them, as with
    /// [`ClientTls::endpoint`], and `alpn` names the protocols offered.
    pub fn rustls_client_config(
        &self,
        alpn: &[&str],
    ) -> Result<std::sync::Arc<rustls::ClientConfig>, TlsError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};

        choose_crypto_provider();
        let invalid = |path: &Path, reason: String| TlsError::Pem {
            path: path.to_path_buf(),
            reason,
        };
        // Every certificate in a PEM file; a file with none is an error.
        let certificates = |path: &Path| {
            let found = CertificateDer::pem_slice_iter(&read(path)?)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|err| invalid(path, err.to_string()))?;
            if found.is_empty() {
                return Err(invalid(path, "no certificate in it".into()));
            }
            Ok(found)
        };
        let mut roots = rustls::RootCertStore::empty();
        if let Some(ca) = &self.ca_file {
            for cert in certificates(ca)? {
                roots
                    .add(cert)
                    .map_err(|err| invalid(ca, err.to_string()))?;
            }
        }
        let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
        let mut config = match (&self.cert_file, &self.key_file) {
            (Some(cert_file), Some(key_file)) => {
                let chain = certificates(cert_file)?;
                let key = PrivateKeyDer::from_pem_slice(&read(key_file)?)
                    .map_err(|err| invalid(key_file, err.to_string()))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|err| invalid(cert_file, err.to_string()))?
            }
            _ => builder.with_no_client_auth(),
        };
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        Ok(std::sync::Arc::new(config))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::GrpcServer;
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    struct Issued {
        cert: String,
        key: String,
    }

    /// A CA, a server certificate for `localhost` and a client certificate.
    fn pki() -> (String, Issued, Issued) {
        let ca_key = KeyPair::generate().expect("ca key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).expect("ca");
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let issue = |name: &str| {
            let key = KeyPair::generate().expect("key");
            let params = CertificateParams::new(vec![name.to_string()]).expect("params");
            let cert = params.signed_by(&key, &issuer).expect("sign");
            Issued {
                cert: cert.pem(),
                key: key.serialize_pem(),
            }
        };
        (ca.pem(), issue("localhost"), issue("gateway"))
    }

    /// Writes PEM text to a named file in `dir`, answering its path.
    fn writer(dir: &Path) -> impl Fn(&str, &str) -> PathBuf + '_ {
        move |name, text| {
            let path = dir.join(name);
            std::fs::write(&path, text).expect("write");
            path
        }
    }

    #[tokio::test]
    async fn a_mutual_tls_server_refuses_callers_without_a_client_certificate() {
        let dir = tempfile::tempdir().expect("dir");
        let (ca, server, client) = pki();
        let write = writer(dir.path());
        let ca_file = write("ca.pem", &ca);
        let tls = ServerTls {
            cert_file: Some(write("server.pem", &server.cert)),
            key_file: Some(write("server.key", &server.key)),
            client_ca_file: Some(ca_file.clone()),
        };
        tls.validate("profiles").expect("valid");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let shutdown = crate::CancellationToken::new();
        let server = GrpcServer::new().with_tls(tls.load().expect("tls"));
        let serving = tokio::spawn(server.serve(listener, shutdown.clone()));
        let url = format!("https://localhost:{port}");

        let with_cert = ClientTls {
            ca_file: Some(ca_file.clone()),
            cert_file: Some(write("client.pem", &client.cert)),
            key_file: Some(write("client.key", &client.key)),
            domain: None,
        };
        let channel = with_cert
            .endpoint(&url)
            .expect("endpoint")
            .connect()
            .await
            .expect("connects");
        let answer = HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("the gateway's certificate is accepted");
        assert_eq!(answer.get_ref().status, 1, "SERVING");

        let without_cert = ClientTls {
            ca_file: Some(ca_file),
            ..ClientTls::default()
        };
        let refused = match without_cert
            .endpoint(&url)
            .expect("endpoint")
            .connect()
            .await
        {
            Err(_) => true,
            Ok(channel) => HealthClient::new(channel)
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .is_err(),
        };
        assert!(refused, "no client certificate, no call");
        shutdown.cancel();
        serving.await.expect("task").expect("served");
    }

    #[test]
    fn a_rustls_client_configuration_needs_usable_pem() {
        let dir = tempfile::tempdir().expect("dir");
        let (ca, _server, client) = pki();
        let write = writer(dir.path());
        let good = ClientTls {
            ca_file: Some(write("ca.pem", &ca)),
            cert_file: Some(write("client.pem", &client.cert)),
            key_file: Some(write("client.key", &client.key)),
            domain: None,
        };
        let config = good.rustls_client_config(&["h2"]).expect("config");
        assert_eq!(config.alpn_protocols, vec![b"h2".to_vec()]);
        assert!(config.client_auth_cert_resolver.has_certs());

        let no_certificate = ClientTls {
            ca_file: Some(write("empty.pem", "not a certificate")),
            ..ClientTls::default()
        };
        let no_chain = ClientTls {
            cert_file: Some(write("nothing.pem", "not a certificate")),
            ..good.clone()
        };
        let not_a_key = ClientTls {
            key_file: Some(write("wrong.key", &client.cert)),
            ..good.clone()
        };
        let missing = ClientTls {
            ca_file: Some(dir.path().join("absent.pem")),
            ..ClientTls::default()
        };
        for (what, tls) in [
            ("a CA file without a certificate", no_certificate),
            ("a key file holding a certificate", not_a_key),
            ("a certificate file without a certificate", no_chain),
        ] {
            assert!(
                matches!(tls.rustls_client_config(&["h2"]), Err(TlsError::Pem { .. })),
                "{what}"
            );
        }
        assert!(matches!(
            missing.rustls_client_config(&["h2"]),
            Err(TlsError::Read { .. })
        ));
    }

    #[test]
    fn half_configured_tls_is_an_error() {
        let tls = ServerTls {
            cert_file: Some("cert.pem".into()),
            ..ServerTls::default()
        };
        assert!(tls.validate("profiles").is_err());
        let client = ClientTls {
            key_file: Some("key.pem".into()),
            ..ClientTls::default()
        };
        assert!(client.validate("gateway.upstream_tls").is_err());
        assert!(ServerTls::default().load().expect("plain").is_none());
    }

    #[test]
    fn a_url_is_http_or_https_and_https_needs_a_ca() {
        let plain = ClientTls::default();
        let url_field = "segments.profiles_url";
        let field = "segments.profiles_tls";
        plain
            .validate_url(field, url_field, "http://profiles:50052")
            .expect("plain http");
        let wrong = plain
            .validate_url(field, url_field, "grpc://profiles:50052")
            .expect_err("not http");
        assert!(wrong.to_string().contains(url_field));
        let no_ca = plain
            .validate_url(field, url_field, "https://profiles:50052")
            .expect_err("https without a CA");
        assert!(no_ca.to_string().contains("segments.profiles_tls.ca_file"));
        let trusted = ClientTls {
            ca_file: Some("ca.pem".into()),
            ..ClientTls::default()
        };
        trusted
            .validate_url(field, url_field, "https://profiles:50052")
            .expect("https with a CA");
    }
}
