//! Token keys from the issuer's JWKS document, served over HTTP: keys are
//! picked by `kid`, pinned to their algorithms, and a key the issuer adds is
//! in force after the next refresh without a restart.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use madtech_common::testing::Backend;
use madtech_gateway::keys::JwksConfig;
use madtech_gateway::token::Claims;
use madtech_proto::segments::v1 as segments_pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

use crate::harness::Suite;

/// A P-256 key pair: the signing key and its public JWK.
struct EcKey {
    signing: EncodingKey,
    jwk: serde_json::Value,
}

fn ec_key(kid: &str) -> EcKey {
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let pkcs8 =
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("generate");
    let pair =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).expect("pair");
    // An uncompressed point: 0x04, then x and y, 32 bytes each.
    let point = pair.public_key().as_ref();
    EcKey {
        signing: EncodingKey::from_ec_der(pkcs8.as_ref()),
        jwk: serde_json::json!({
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": kid,
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..65]),
        }),
    }
}

fn token(suite: &Suite, key: &EncodingKey, alg: Algorithm, kid: Option<&str>) -> String {
    let now = jsonwebtoken::get_current_timestamp();
    let claims = Claims {
        sub: "idp-user".into(),
        roles: vec!["marketer".into()],
        iss: suite.config.gateway.auth.issuer.clone(),
        aud: suite.config.gateway.auth.audience.clone(),
        iat: now,
        nbf: now,
        exp: now + 300,
    };
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    jsonwebtoken::encode(&header, &claims, key).expect("sign")
}

/// Serves `document` at any path over plain HTTP/1.1, re-read per request.
async fn serve_jwks(document: Arc<Mutex<String>>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let body = document.lock().expect("document").clone();
            tokio::spawn(async move {
                let mut request = [0u8; 4096];
                let _ = socket.read(&mut request).await;
                let response = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
            });
        }
    });
    format!("http://{address}/.well-known/jwks.json")
}

async fn call(suite: &Suite, token: &str) -> Code {
    let bearer = Suite::raw_bearer(&format!("Bearer {token}"));
    match suite
        .segments(bearer)
        .get_segment(segments_pb::GetSegmentRequest {
            segment_id: "none".into(),
        })
        .await
    {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

#[tokio::test]
async fn jwks_keys_verify_by_kid_and_rotate_without_a_restart() {
    let first = ec_key("first");
    let second = ec_key("second");
    let document = Arc::new(Mutex::new(
        serde_json::json!({ "keys": [first.jwk] }).to_string(),
    ));
    let url = serve_jwks(Arc::clone(&document)).await;
    let suite = Suite::start_with(Backend::Sqlite, |config| {
        config.gateway.auth.jwks = Some(JwksConfig {
            source: url,
            refresh: Duration::from_millis(200),
            algorithms: vec!["ES256".into()],
        });
    })
    .await;

    // NOT_FOUND: authenticated and authorized, and the segment is unknown.
    let good = token(&suite, &first.signing, Algorithm::ES256, Some("first"));
    assert_eq!(call(&suite, &good).await, Code::NotFound);
    let no_kid = token(&suite, &first.signing, Algorithm::ES256, None);
    assert_eq!(call(&suite, &no_kid).await, Code::NotFound);
    // The development key still verifies (fixed keys stay beside the JWKS).
    assert_eq!(
        suite
            .segments(suite.bearer(&["marketer"]))
            .get_segment(segments_pb::GetSegmentRequest {
                segment_id: "none".into()
            })
            .await
            .expect_err("unknown")
            .code(),
        Code::NotFound
    );

    // A key the document does not hold yet, and a kid that names another
    // key, are refused.
    let rotated = token(&suite, &second.signing, Algorithm::ES256, Some("second"));
    assert_eq!(call(&suite, &rotated).await, Code::Unauthenticated);
    let mislabelled = token(&suite, &second.signing, Algorithm::ES256, Some("first"));
    assert_eq!(call(&suite, &mislabelled).await, Code::Unauthenticated);
    // HS256 with the public key's bytes as the secret: refused whatever the kid.
    let x = first.jwk["x"].as_str().expect("x").to_string();
    let confused = token(
        &suite,
        &EncodingKey::from_secret(x.as_bytes()),
        Algorithm::HS256,
        Some("first"),
    );
    assert_eq!(call(&suite, &confused).await, Code::Unauthenticated);

    // The issuer publishes the second key: in force after a refresh.
    *document.lock().expect("document") =
        serde_json::json!({ "keys": [first.jwk, second.jwk] }).to_string();
    let mut code = Code::Unauthenticated;
    for _ in 0..50 {
        code = call(&suite, &rotated).await;
        if code != Code::Unauthenticated {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(code, Code::NotFound, "the rotated key verifies");
    suite.stop().await;
}

#[tokio::test]
async fn a_gateway_whose_jwks_cannot_be_fetched_does_not_start() {
    let data = tempfile::tempdir().expect("dir");
    let missing = data.path().join("missing-jwks.json");
    let started = madtech::suite::InProcess::start(|config| {
        config.data_dir = data.path().to_path_buf();
        config.gateway.policy_dir =
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("policies");
        config.gateway.auth.jwks = Some(JwksConfig {
            source: missing.display().to_string(),
            ..JwksConfig::default()
        });
    })
    .await;
    let err = started.err().expect("fails closed");
    assert!(format!("{err:#}").contains("missing-jwks.json"), "{err:#}");
}
