//! The gateway's own API: the policy in force and the audit trail, for the
//! compliance role.

use std::sync::Arc;

use madtech_common::error::{FieldError, internal};
use madtech_proto::gateway::v1 as pb;
use madtech_proto::time::from_micros;
use pb::audit_service_server::{AuditService, AuditServiceServer};
use pb::policy_service_server::{PolicyService, PolicyServiceServer};
use tonic::{Request, Response, Status};

use crate::audit::{Anchor, AuditLog, Record};
use crate::policy::Policies;

#[derive(Clone)]
pub struct PolicyStatusApi {
    policies: Policies,
}

impl PolicyStatusApi {
    pub fn new(policies: Policies) -> Self {
        PolicyStatusApi { policies }
    }

    pub fn into_server(self) -> PolicyServiceServer<Self> {
        PolicyServiceServer::new(self)
    }
}

#[tonic::async_trait]
impl PolicyService for PolicyStatusApi {
    async fn get_policy_status(
        &self,
        _request: Request<pb::GetPolicyStatusRequest>,
    ) -> Result<Response<pb::GetPolicyStatusResponse>, Status> {
        let policy = self
            .policies
            .current()
            .ok_or_else(|| Status::unavailable("no valid policy set is loaded"))?;
        Ok(Response::new(pb::GetPolicyStatusResponse {
            version: policy.version.clone(),
            loaded_at: Some(from_micros(policy.loaded_at_micros)),
            files: policy.files.clone(),
        }))
    }
}

#[derive(Clone)]
pub struct AuditApi {
    log: Arc<AuditLog>,
}

impl AuditApi {
    pub fn new(log: Arc<AuditLog>) -> Self {
        AuditApi { log }
    }

    pub fn into_server(self) -> AuditServiceServer<Self> {
        AuditServiceServer::new(self)
    }
}

const DEFAULT_AUDIT_PAGE: u32 = 100;
const MAX_AUDIT_PAGE: u32 = 1000;

fn record_to_pb(record: Record) -> pb::AuditRecord {
    let c = record.crossing;
    pb::AuditRecord {
        seq: record.seq,
        recorded_at: Some(from_micros(record.recorded_at_micros)),
        caller: c.caller,
        method: c.method,
        segment_id: c.segment_id,
        destination_id: c.destination_id,
        destination_kind: c.destination_kind,
        purpose: c.purpose,
        policy_version: c.policy_version,
        outcome: c.outcome,
        allowed: c.allowed,
        denied: c.denied.into_iter().collect(),
        identifiers_stripped: c.identifiers_stripped,
        released_digest: c.released_digest,
        previous_hash: record.previous_hash,
        hash: record.hash,
    }
}

#[tonic::async_trait]
impl AuditService for AuditApi {
    async fn list_audit_records(
        &self,
        request: Request<pb::ListAuditRecordsRequest>,
    ) -> Result<Response<pb::ListAuditRecordsResponse>, Status> {
        let request = request.into_inner();
        let page = match request.page_size {
            0 => DEFAULT_AUDIT_PAGE,
            n if n <= MAX_AUDIT_PAGE => n,
            _ => {
                return Err(
                    FieldError::new("page_size", format!("at most {MAX_AUDIT_PAGE}")).into(),
                );
            }
        };
        let records = self
            .log
            .list(request.after_seq, u64::from(page))
            .await
            .map_err(|err| internal("audit log", &err))?;
        Ok(Response::new(pb::ListAuditRecordsResponse {
            records: records.into_iter().map(record_to_pb).collect(),
        }))
    }

    async fn verify_audit_chain(
        &self,
        request: Request<pb::VerifyAuditChainRequest>,
    ) -> Result<Response<pb::VerifyAuditChainResponse>, Status> {
        let request = request.into_inner();
        let anchor = match (request.anchor_seq, request.anchor_hash.as_str()) {
            (0, "") => None,
            (0, _) => return Err(FieldError::new("anchor_seq", "required with anchor_hash").into()),
            (_, hash) if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) => {
                return Err(FieldError::new("anchor_hash", "must be 64 hex digits").into());
            }
            (seq, hash) => Some(Anchor {
                seq,
                hash: hash.to_ascii_lowercase(),
            }),
        };
        let verification = self
            .log
            .verify(anchor.as_ref())
            .await
            .map_err(|err| internal("audit log", &err))?;
        let (last_seq, last_hash) = verification.head.clone().unwrap_or_default();
        Ok(Response::new(pb::VerifyAuditChainResponse {
            intact: verification.first_broken.is_none()
                && (anchor.is_none() || verification.anchor_matched),
            records_checked: verification.checked,
            first_broken_seq: verification.first_broken.unwrap_or(0),
            last_seq,
            last_hash,
            anchor_matched: verification.anchor_matched,
        }))
    }
}
