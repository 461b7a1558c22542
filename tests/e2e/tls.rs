//! The suite over TLS: every service requires a client certificate signed
//! by the deployment's CA (mutual TLS), the gateway serves TLS to callers and
//! presents its certificate upstream, and nothing without a certificate
//! reaches a service.

use std::path::{Path, PathBuf};

use madtech_common::testing::Backend;
use madtech_common::tls::{ClientTls, ServerTls};
use madtech_proto::profiles::v1 as profiles_pb;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

use crate::harness::Suite;

struct Pki {
    ca: PathBuf,
    server: (PathBuf, PathBuf),
    gateway: (PathBuf, PathBuf),
    segments: (PathBuf, PathBuf),
    consent: (PathBuf, PathBuf),
}

fn pki(dir: &Path) -> Pki {
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write");
        path
    };
    let ca_key = KeyPair::generate().expect("key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).expect("ca");
    let issuer = Issuer::new(ca_params, ca_key);
    let issue = |name: &str, sans: &[&str]| {
        let key = KeyPair::generate().expect("key");
        let params = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("params");
        let cert = params.signed_by(&key, &issuer).expect("sign");
        (
            write(&format!("{name}.pem"), cert.pem()),
            write(&format!("{name}.key"), key.serialize_pem()),
        )
    };
    Pki {
        server: issue("server", &["localhost", "127.0.0.1"]),
        gateway: issue("gateway", &["gateway"]),
        segments: issue("segments", &["segments"]),
        consent: issue("consent", &["consent"]),
        ca: write("ca.pem", ca.pem()),
    }
}

#[tokio::test]
async fn the_suite_runs_on_mutual_tls_and_services_refuse_strangers() {
    let dir = tempfile::tempdir().expect("dir");
    let pki = pki(dir.path());
    let server = |client_ca: bool| ServerTls {
        cert_file: Some(pki.server.0.clone()),
        key_file: Some(pki.server.1.clone()),
        client_ca_file: client_ca.then(|| pki.ca.clone()),
    };
    let client = |identity: Option<&(PathBuf, PathBuf)>| ClientTls {
        ca_file: Some(pki.ca.clone()),
        cert_file: identity.map(|i| i.0.clone()),
        key_file: identity.map(|i| i.1.clone()),
        domain: None,
    };
    let suite = Suite::start_with(Backend::Sqlite, |config| {
        config.profiles.tls = server(true);
        config.consent.tls = server(true);
        config.segments.tls = server(true);
        config.activation.tls = server(true);
        config.gateway.tls = server(false);
        config.gateway.upstream_tls = client(Some(&pki.gateway));
        config.segments.profiles_tls = client(Some(&pki.segments));
        config.consent.profiles_tls = client(Some(&pki.consent));
        config.activation.gateway_tls = client(None);
        config.consent.gateway_tls = client(None);
    })
    .await;
    assert!(
        suite
            .config
            .gateway
            .upstreams
            .profiles
            .starts_with("https://")
    );

    // Everything works through the gateway, over TLS end to end.
    suite
        .profiles(suite.bearer(&["admin"]))
        .upsert_profile(profiles_pb::UpsertProfileRequest {
            identifiers: vec![profiles_pb::Identifier {
                kind: "email".into(),
                value: "tls@example.com".into(),
            }],
            traits: Default::default(),
            region: "US-CA".into(),
            ..Default::default()
        })
        .await
        .expect("upsert over TLS");
    let segment = suite.region_segment("california", &["US-CA"]).await;
    let crossed = suite.export(&segment.segment_id).await.len();
    assert_eq!(crossed, 1);

    // A caller without a client certificate reaches no service, even with
    // the right CA and address.
    let url = suite.config.gateway.upstreams.profiles.clone();
    let stranger = client(None).endpoint(&url).expect("endpoint");
    let refused = match stranger.connect().await {
        Err(_) => true,
        Ok(channel) => profiles_pb::profile_service_client::ProfileServiceClient::new(channel)
            .get_profile(profiles_pb::GetProfileRequest {
                lookup: Some(profiles_pb::get_profile_request::Lookup::ProfileId(
                    "x".into(),
                )),
            })
            .await
            .is_err(),
    };
    assert!(refused, "a service answered a caller without a certificate");
    suite.stop().await;
}
