//! The gateway's own API: what it enforces right now.

use madtech_proto::gateway::v1 as pb;
use madtech_proto::time::from_micros;
use pb::policy_service_server::{PolicyService, PolicyServiceServer};
use tonic::{Request, Response, Status};

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
