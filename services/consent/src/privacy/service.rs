//! The gRPC edge of data-subject requests: validates, stores, wakes the
//! worker, and answers with the request's progress.

use std::sync::Arc;

use chrono::Utc;
use madtech_common::error::FieldError;
use madtech_common::validate;
use madtech_proto::consent::v1 as pb;
use madtech_proto::time::duration_micros;
use madtech_proto::time::from_micros;
use pb::privacy_request_service_server::{PrivacyRequestService, PrivacyRequestServiceServer};
use tonic::{Request, Response, Status};

use super::store::RequestStore;
use super::worker::Worker;
use super::{Kind, PrivacyRequest, Status as RequestStatus};
use crate::rules::ConsentRules;

const MAX_ID_LEN: usize = 128;
const MAX_VALUE_LEN: usize = 320;
const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 500;

#[derive(Clone)]
pub struct PrivacyApi {
    store: Arc<RequestStore>,
    worker: Arc<Worker>,
    rules: Arc<ConsentRules>,
}

impl PrivacyApi {
    pub fn new(store: Arc<RequestStore>, worker: Arc<Worker>, rules: Arc<ConsentRules>) -> Self {
        PrivacyApi {
            store,
            worker,
            rules,
        }
    }

    pub fn into_server(self) -> PrivacyRequestServiceServer<Self> {
        PrivacyRequestServiceServer::new(self)
    }
}

fn kind_from_pb(kind: i32) -> Result<Kind, FieldError> {
    match pb::PrivacyRequestKind::try_from(kind) {
        Ok(pb::PrivacyRequestKind::Access) => Ok(Kind::Access),
        Ok(pb::PrivacyRequestKind::Erasure) => Ok(Kind::Erasure),
        Ok(pb::PrivacyRequestKind::OptOutOfSaleSharing) => Ok(Kind::OptOutOfSaleSharing),
        _ => Err(FieldError::new(
            "kind",
            "must be ACCESS, ERASURE or OPT_OUT_OF_SALE_SHARING",
        )),
    }
}

fn kind_to_pb(kind: Kind) -> pb::PrivacyRequestKind {
    match kind {
        Kind::Access => pb::PrivacyRequestKind::Access,
        Kind::Erasure => pb::PrivacyRequestKind::Erasure,
        Kind::OptOutOfSaleSharing => pb::PrivacyRequestKind::OptOutOfSaleSharing,
    }
}

fn status_to_pb(status: RequestStatus) -> pb::PrivacyRequestStatus {
    match status {
        RequestStatus::Open => pb::PrivacyRequestStatus::Open,
        RequestStatus::Completed => pb::PrivacyRequestStatus::Completed,
    }
}

fn request_to_pb(request: &PrivacyRequest, with_export: bool) -> pb::PrivacyRequest {
    let export_json = if with_export && request.status == RequestStatus::Completed {
        serde_json::to_vec(&request.export).unwrap_or_default()
    } else {
        Vec::new()
    };
    pb::PrivacyRequest {
        request_id: request.id.clone(),
        kind: kind_to_pb(request.kind).into(),
        status: status_to_pb(request.status).into(),
        subject_kind: request.subject_kind.clone(),
        subject_digest: request.subject_digest.clone(),
        region: request.region.clone(),
        regime: request.regime.clone(),
        submitted_at: Some(from_micros(request.submitted_at_micros)),
        deadline: Some(from_micros(request.deadline_micros)),
        completed_at: request.completed_at_micros.map(from_micros),
        steps: request
            .steps
            .iter()
            .map(|step| pb::PrivacyRequestStep {
                name: step.name.as_str().to_string(),
                status: if step.done {
                    pb::PrivacyStepStatus::Done
                } else {
                    pb::PrivacyStepStatus::Pending
                }
                .into(),
                attempts: step.attempts,
                last_error: step.last_error.clone(),
                done_at: step.done_at_micros.map(from_micros),
            })
            .collect(),
        export_json,
        remaining: request.remaining.clone().into_iter().collect(),
    }
}

fn request_id(field: &str, value: &str) -> Result<String, FieldError> {
    Ok(validate::text(field, value, MAX_ID_LEN)?.to_string())
}

#[tonic::async_trait]
impl PrivacyRequestService for PrivacyApi {
    async fn submit_request(
        &self,
        request: Request<pb::SubmitRequestRequest>,
    ) -> Result<Response<pb::SubmitRequestResponse>, Status> {
        let request = request.into_inner();
        let id = request_id("request_id", &request.request_id)?;
        let kind = kind_from_pb(request.kind)?;
        let subject = request
            .subject
            .ok_or_else(|| FieldError::required("subject"))?;
        let subject_kind = validate::policy_name("subject.kind", &subject.kind)?;
        let subject_value = validate::text("subject.value", &subject.value, MAX_VALUE_LEN)?;
        let region = validate::region("region", &request.region)?;
        let now = Utc::now().timestamp_micros();
        let (regime, within) = self.rules.request_deadline(&region);
        let deadline = now.saturating_add(duration_micros(within));
        let new = PrivacyRequest::new(
            id,
            kind,
            (subject_kind, subject_value.to_string()),
            region,
            (regime, deadline),
            now,
        );
        let (stored, created) = self.store.insert(&new).await?;
        let same = stored.kind == new.kind
            && stored.subject_kind == new.subject_kind
            && stored.subject_digest == new.subject_digest
            && stored.region == new.region;
        if !same {
            return Err(Status::already_exists(format!(
                "request {} exists with another kind, subject or region",
                new.id
            )));
        }
        if created {
            self.worker.wake();
        }
        Ok(Response::new(pb::SubmitRequestResponse {
            request: Some(request_to_pb(&stored, false)),
            created,
        }))
    }

    async fn get_request(
        &self,
        request: Request<pb::GetRequestRequest>,
    ) -> Result<Response<pb::GetRequestResponse>, Status> {
        let id = request_id("request_id", &request.get_ref().request_id)?;
        let stored = self
            .store
            .get(&id)
            .await?
            .ok_or_else(|| Status::not_found(format!("no privacy request {id}")))?;
        Ok(Response::new(pb::GetRequestResponse {
            request: Some(request_to_pb(&stored, true)),
        }))
    }

    async fn list_requests(
        &self,
        request: Request<pb::ListRequestsRequest>,
    ) -> Result<Response<pb::ListRequestsResponse>, Status> {
        let request = request.into_inner();
        let page = match request.page_size {
            0 => DEFAULT_PAGE,
            n if n <= MAX_PAGE => n,
            _ => {
                return Err(FieldError::new("page_size", format!("at most {MAX_PAGE}")).into());
            }
        };
        let status = match pb::PrivacyRequestStatus::try_from(request.status) {
            Ok(pb::PrivacyRequestStatus::Unspecified) => None,
            Ok(pb::PrivacyRequestStatus::Open) => Some(RequestStatus::Open),
            Ok(pb::PrivacyRequestStatus::Completed) => Some(RequestStatus::Completed),
            Err(_) => return Err(FieldError::new("status", "unknown status").into()),
        };
        let requests = self
            .store
            .list(&request.after_request_id, status, u64::from(page))
            .await?;
        Ok(Response::new(pb::ListRequestsResponse {
            requests: requests.iter().map(|r| request_to_pb(r, false)).collect(),
        }))
    }
}
