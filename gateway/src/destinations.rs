//! Where a crossing goes. The policies decide by destination *kind* (Meta,
//! Google, a file…), and the kind decides which identifiers cross and how
//! they are hashed, so the gateway never takes it from the caller: it reads
//! it from the activation service's destination registry, the same record
//! the activation service sends by. A destination the registry does not know,
//! or a registry that cannot be read, lets nothing cross.

use std::collections::BTreeMap;

use activation_pb::activation_service_client::ActivationServiceClient;
use madtech_common::upstream::Upstream;
use madtech_proto::activation::v1 as activation_pb;
use tonic::{Code, Status};

use crate::crossing::with_deadline;

#[derive(Clone)]
pub struct DestinationRegistry {
    activation: ActivationServiceClient<Upstream>,
}

impl DestinationRegistry {
    pub fn new(activation: Upstream) -> Self {
        DestinationRegistry {
            activation: ActivationServiceClient::new(activation),
        }
    }

    /// The registered kind of `destination_id`.
    pub async fn kind_of(
        &self,
        destination_id: &str,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<String, Status> {
        let request = with_deadline(
            activation_pb::GetDestinationRequest {
                destination_id: destination_id.to_string(),
            },
            deadline,
        )?;
        let destination = self
            .activation
            .clone()
            .get_destination(request)
            .await
            .map_err(|status| refusal(destination_id, &status))?
            .into_inner()
            .destination;
        match destination {
            Some(destination) if !destination.kind.is_empty() => Ok(destination.kind),
            _ => {
                tracing::error!(
                    destination_id,
                    "the destination registry answered without a kind; nothing crosses"
                );
                Err(Status::internal(
                    "the destination registry answered without a kind",
                ))
            }
        }
    }

    /// The registered kinds of several destinations, by id; fails on the
    /// first the registry does not know.
    pub async fn kinds_of(
        &self,
        destination_ids: &[String],
        deadline: Option<tokio::time::Instant>,
    ) -> Result<BTreeMap<String, String>, Status> {
        let mut kinds = BTreeMap::new();
        for id in destination_ids {
            kinds.insert(id.clone(), self.kind_of(id, deadline).await?);
        }
        Ok(kinds)
    }
}

/// The caller learns whether the destination is unknown or the registry
/// unreachable, nothing of the registry's own error text.
fn refusal(destination_id: &str, status: &Status) -> Status {
    match status.code() {
        Code::NotFound => Status::not_found(format!(
            "destination {destination_id:?} is not registered with the activation service; nothing crosses to it"
        )),
        Code::InvalidArgument => {
            Status::invalid_argument(format!("destination_id: {}", status.message()))
        }
        Code::DeadlineExceeded => Status::deadline_exceeded(
            "the caller's deadline passed while reading the destination registry",
        ),
        code => {
            tracing::warn!(
                ?code,
                destination_id,
                "destination registry unavailable; nothing crosses"
            );
            Status::unavailable(
                "the destination registry (activation service) cannot be read; nothing crosses",
            )
        }
    }
}

/// A kind the caller named must be the registered one: an activation that
/// believes it sends to a file while the registry says Meta is a bug to
/// surface, not a choice of policy.
pub fn check_named_kind(destination_id: &str, named: &str, registered: &str) -> Result<(), Status> {
    if named.is_empty() || named == registered {
        return Ok(());
    }
    Err(Status::invalid_argument(format!(
        "destination_kind: destination {destination_id:?} is registered as {registered:?}, not {named:?}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unnamed_or_matching_kind_is_accepted_and_another_refused() {
        assert!(check_named_kind("d1", "", "meta").is_ok());
        assert!(check_named_kind("d1", "meta", "meta").is_ok());
        let refused = check_named_kind("d1", "file", "meta").expect_err("another kind");
        assert_eq!(refused.code(), Code::InvalidArgument);
        assert!(refused.message().starts_with("destination_kind:"));
        assert!(refused.message().contains("\"meta\""));
    }

    #[test]
    fn registry_failures_fail_closed_without_its_error_text() {
        let unknown = refusal("d9", &Status::not_found("destination not found"));
        assert_eq!(unknown.code(), Code::NotFound);
        assert!(unknown.message().contains("\"d9\""));
        let down = refusal("d9", &Status::unavailable("tcp connect error: 10.0.0.7"));
        assert_eq!(down.code(), Code::Unavailable);
        assert!(!down.message().contains("10.0.0.7"));
        let odd = refusal("d9", &Status::internal("database: disk I/O error"));
        assert_eq!(odd.code(), Code::Unavailable);
        assert!(!odd.message().contains("disk"));
    }

    #[tokio::test]
    async fn an_unreachable_registry_lets_nothing_cross() {
        // Port 9 (discard) on loopback: nothing listens.
        let channel = Upstream::new(&Default::default(), "http://127.0.0.1:9").expect("upstream");
        let registry = DestinationRegistry::new(channel);
        let refused = registry
            .kind_of("d1", None)
            .await
            .expect_err("nothing listens");
        assert_eq!(refused.code(), Code::Unavailable);
    }
}
