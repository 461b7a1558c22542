//! Destinations: where an activation delivers, and the connectors that speak
//! each platform's API. A sync hands a connector one batch at a time; the
//! connector shapes it the way its platform documents, and [`Delivery`]
//! sends it with retries. Nothing here sees a raw identifier: members are
//! pseudonymous ids with SHA-256 hashes, as the gateway released them.

mod file;
mod google;
mod http;
mod linkedin;
mod meta;
mod oauth;
mod secret;
mod ttd;
mod webhook;

use std::path::PathBuf;

use madtech_common::error::FieldError;
use serde::{Deserialize, Serialize};

pub use file::{FileFormat, file_directory, write_batch};
pub use http::{DeliveryError, RetryPolicy};
pub use oauth::{GOOGLE_TOKEN_URL, OAuthRefresh};
pub use secret::SecretRef;
pub use webhook::signature as webhook_signature;

use http::HttpSender;

/// An identifier as it crossed the gateway: its kind and a hash.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HashedIdentifier {
    pub kind: String,
    pub sha256: String,
}

/// One person as a destination knows them.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Member {
    pub id: String,
    pub identifiers: Vec<HashedIdentifier>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Add,
    Remove,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Add => "add",
            Op::Remove => "remove",
        }
    }
}

/// One request's worth of changes. `session` and `seq` name the batch
/// stably, so a batch sent again after a crash is recognisably the same one
/// (Meta's multi-batch sessions, webhook idempotency keys, file names).
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    pub op: Op,
    pub session: &'a str,
    /// 1-based position of the batch among this session's batches of `op`.
    pub seq: u32,
    pub last: bool,
    /// Members of `op` in the whole session.
    pub total: u64,
    /// The activation's purpose (Google's consent fields depend on it).
    pub purpose: &'a str,
    pub members: &'a [Member],
}

/// Where a destination delivers, as stored. Credentials are references to
/// where they can be read, never the credentials themselves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    /// Files in a directory below the service's file root.
    File {
        directory: PathBuf,
        #[serde(default)]
        format: FileFormat,
    },
    /// A Meta Custom Audience.
    Meta {
        audience_id: String,
        access_token: SecretRef,
        base_url: String,
    },
    /// Signed JSON batches to an HTTPS endpoint.
    Webhook {
        url: String,
        signing_secret: SecretRef,
        batch_size: usize,
    },
    /// A Google Ads Customer Match user list.
    GoogleAds {
        customer_id: String,
        user_list_id: String,
        /// The manager account the call goes through; empty for none.
        login_customer_id: String,
        /// A fixed access token; `None` when `oauth` mints them.
        #[serde(default)]
        access_token: Option<SecretRef>,
        developer_token: SecretRef,
        base_url: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        oauth: Option<OAuthRefresh>,
    },
    /// A The Trade Desk CRM data segment.
    TheTradeDesk {
        advertiser_id: String,
        crm_data_id: String,
        auth_token: SecretRef,
        base_url: String,
    },
    /// A LinkedIn Matched Audiences (DMP) segment.
    Linkedin {
        segment_id: String,
        access_token: SecretRef,
        base_url: String,
    },
}

/// Members per file written by a file destination.
const FILE_BATCH: usize = 50_000;
/// Default members per webhook request.
pub const WEBHOOK_DEFAULT_BATCH: usize = 1_000;
/// The largest webhook batch a destination may ask for.
pub const WEBHOOK_MAX_BATCH: usize = 10_000;

impl Target {
    /// The destination kind the gateway's policies know it by.
    pub fn kind(&self) -> &'static str {
        match self {
            Target::File { .. } => "file",
            Target::Meta { .. } => "meta",
            Target::Webhook { .. } => "webhook",
            Target::GoogleAds { .. } => "google_ads",
            Target::TheTradeDesk { .. } => "the_trade_desk",
            Target::Linkedin { .. } => "linkedin",
        }
    }

    /// Most members one request (or file) may carry.
    pub fn batch_limit(&self) -> usize {
        match self {
            Target::File { .. } => FILE_BATCH,
            Target::Meta { .. } => meta::MAX_USERS_PER_REQUEST,
            Target::Webhook { batch_size, .. } => *batch_size,
            Target::GoogleAds { .. } => google::MAX_PEOPLE_PER_BATCH,
            Target::TheTradeDesk { .. } => ttd::MAX_PEOPLE_PER_DROP,
            Target::Linkedin { .. } => linkedin::MAX_PEOPLE_PER_REQUEST,
        }
    }
}

/// Checks an endpoint a destination will be sent to: HTTPS, or plain HTTP to
/// this machine only (local mocks and sandboxes), with nothing after the
/// path that could smuggle parameters.
pub fn endpoint_url(field: &str, url: &str) -> Result<String, FieldError> {
    let url = url.trim().trim_end_matches('/');
    let parsed = reqwest::Url::parse(url)
        .map_err(|err| FieldError::new(field, format!("not a URL: {err}")))?;
    let loopback = matches!(parsed.host_str(), Some("127.0.0.1" | "localhost" | "[::1]"));
    match parsed.scheme() {
        "https" => {}
        "http" if loopback => {}
        _ => {
            return Err(FieldError::new(
                field,
                "must be https:// (plain http:// only to this machine)",
            ));
        }
    }
    if parsed.query().is_some() || parsed.fragment().is_some() || !parsed.username().is_empty() {
        return Err(FieldError::new(
            field,
            "must not carry a query, a fragment or credentials",
        ));
    }
    Ok(url.to_string())
}

/// What a delivered batch left behind.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// Where the batch went when that is a place (a file's path).
    pub output: Option<String>,
}

/// Sends batches to destinations: the shared HTTP client and retry policy,
/// and the directory file destinations are confined to.
#[derive(Clone)]
pub struct Delivery {
    http: HttpSender,
    file_root: PathBuf,
    tokens: oauth::Tokens,
}

impl Delivery {
    pub fn new(retry: RetryPolicy, file_root: PathBuf) -> Result<Self, DeliveryError> {
        Ok(Delivery {
            http: HttpSender::new(retry)?,
            file_root,
            tokens: oauth::Tokens::default(),
        })
    }

    /// Delivers one batch; `retries` counts the requests repeated on the way.
    /// `name` prefixes what a file destination writes.
    pub async fn send(
        &self,
        target: &Target,
        name: &str,
        batch: Batch<'_>,
        retries: &mut u64,
    ) -> Result<Receipt, DeliveryError> {
        match target {
            Target::File { directory, format } => {
                let directory = self.file_root.join(directory);
                let file_name = format!(
                    "{name}-{}-{:05}.{}",
                    batch.op.as_str(),
                    batch.seq,
                    format.extension()
                );
                let members = batch.members.to_vec();
                let (op, format) = (batch.op, *format);
                let written = tokio::task::spawn_blocking(move || {
                    write_batch(&directory, &file_name, format, op, &members)
                })
                .await
                .map_err(|err| DeliveryError::Local(format!("file writer stopped: {err}")))??;
                Ok(Receipt {
                    output: Some(written.display().to_string()),
                })
            }
            Target::Meta {
                audience_id,
                access_token,
                base_url,
            } => {
                let Some(request) = meta::request(base_url, audience_id, batch)? else {
                    return Ok(Receipt::default());
                };
                let token = access_token.read().await?;
                self.http
                    .send(request.bearer(&token)?, retries)
                    .await
                    .map(|_| Receipt::default())
            }
            Target::Webhook {
                url,
                signing_secret,
                ..
            } => {
                let secret = signing_secret.read().await?;
                let request = webhook::request(url, &secret, batch)?;
                self.http
                    .send(request, retries)
                    .await
                    .map(|_| Receipt::default())
            }
            Target::GoogleAds {
                customer_id,
                user_list_id,
                login_customer_id,
                access_token,
                developer_token,
                base_url,
                oauth,
            } => {
                let access_token = match (access_token, oauth) {
                    (Some(token), _) => token.read().await?,
                    (None, Some(oauth)) => {
                        self.tokens.access_token(&self.http, oauth, retries).await?
                    }
                    (None, None) => {
                        return Err(DeliveryError::Credential(
                            "no Google Ads access token or OAuth client configured".into(),
                        ));
                    }
                };
                let developer_token = developer_token.read().await?;
                let account = google::Account {
                    base_url,
                    customer_id,
                    user_list_id,
                    login_customer_id,
                    access_token: &access_token,
                    developer_token: &developer_token,
                };
                // One job per batch: created, filled, run. A job left
                // unrun by a failure is never run, so it changes nothing.
                let created = self
                    .http
                    .send(account.create_job(batch.purpose)?, retries)
                    .await?;
                let job = google::job_name(&created, customer_id)?;
                let Some(operations) = account.add_operations(&job, batch)? else {
                    return Ok(Receipt::default());
                };
                self.http.send(operations, retries).await?;
                self.http.send(account.run_job(&job)?, retries).await?;
                Ok(Receipt::default())
            }
            Target::TheTradeDesk {
                advertiser_id,
                crm_data_id,
                auth_token,
                base_url,
            } => {
                let Some(body) = ttd::drop_body(batch)? else {
                    return Ok(Receipt::default());
                };
                let auth_token = auth_token.read().await?;
                let account = ttd::Account {
                    base_url,
                    advertiser_id,
                    crm_data_id,
                    auth_token: &auth_token,
                };
                let answer = self
                    .http
                    .send(account.drop_request(batch.op)?, retries)
                    .await?;
                let url = ttd::drop_url(&answer, base_url)?;
                self.http.send(ttd::upload(url, body), retries).await?;
                Ok(Receipt::default())
            }
            Target::Linkedin {
                segment_id,
                access_token,
                base_url,
            } => {
                let access_token = access_token.read().await?;
                let Some(request) = linkedin::request(base_url, segment_id, &access_token, batch)?
                else {
                    return Ok(Receipt::default());
                };
                let answer = self.http.send(request, retries).await?;
                linkedin::check_answer(&answer)?;
                Ok(Receipt::default())
            }
        }
    }
}
