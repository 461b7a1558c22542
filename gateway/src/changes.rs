//! The second audience crossing: `SegmentService/ExportAudienceChanges`, a
//! segment's membership changes as a sync follows them after exporting the
//! audience once. Each entered change is decided and minimised exactly as
//! `ExportAudience` decides and minimises a member (`crossing::Filter`);
//! a person the policy does not let cross arrives as someone not in the
//! audience, and every change names the person only by their pseudonymous
//! id for the destination.
//!
//! Each page of changes is audited before any of it is released (the
//! stream may follow the segment for as long as the caller likes, so it is
//! audited per page, like the consent releases); nothing is released when
//! the audit cannot be written.

use std::sync::Arc;

use futures::Stream;
use madtech_proto::segments::v1 as segments_pb;
use tonic::{Request, Response, Status};

use crate::audit;
use crate::crossing::{
    Accepted, Audited, Crossing, Filter, Ledger, name_policy_version, no_policy, policy_failure,
};
use crate::page::MemberView;

/// The gRPC path of this crossing.
pub const EXPORT_AUDIENCE_CHANGES: &str =
    "/madtech.segments.v1.SegmentService/ExportAudienceChanges";

type Changes = std::pin::Pin<
    Box<dyn Stream<Item = Result<segments_pb::ExportAudienceChangesResponse, Status>> + Send>,
>;

impl Crossing {
    /// Handles one `ExportAudienceChanges` call at the HTTP level.
    pub async fn handle_changes(
        self,
        request: http::Request<tonic::body::Body>,
    ) -> http::Response<tonic::body::Body> {
        let codec = tonic_prost::ProstCodec::<
            segments_pb::ExportAudienceChangesResponse,
            segments_pb::ExportAudienceChangesRequest,
        >::default();
        let mut grpc = tonic::server::Grpc::new(codec);
        let service = tower::service_fn(move |request| self.clone().changes(request));
        grpc.server_streaming(service, request).await
    }

    async fn changes(
        self,
        request: Request<segments_pb::ExportAudienceChangesRequest>,
    ) -> Result<Response<Changes>, Status> {
        let accepted = self.accept(request).await?;
        let base = accepted.audit_base(EXPORT_AUDIENCE_CHANGES);
        let Accepted {
            deadline,
            request,
            policy,
            ..
        } = accepted;
        let codec = tonic_prost::ProstCodec::<
            segments_pb::ExportAudienceChangesRequest,
            segments_pb::ExportAudienceChangesResponse,
        >::default();
        let mut upstream = self
            .upstream(EXPORT_AUDIENCE_CHANGES, request.clone(), deadline, codec)
            .await?
            .into_inner();
        let started_under = policy.version.clone();
        let crossing = self.clone();
        let stream = async_stream::try_stream! {
            let audited = |policy_version: &str| Audited {
                ledger: Ledger::default(),
                log: Arc::clone(&crossing.audit),
                base: audit::Crossing {
                    policy_version: policy_version.to_string(),
                    ..base.clone()
                },
                recorded: false,
            };
            let mut pages = 0_u64;
            while let Some(page) = upstream.message().await? {
                // Consent as it stands when the page crosses: a follower
                // may run for days.
                let freshness = crossing.consent.freshness(deadline).await?;
                // And the policy in force then: a reload reaches followers
                // that started before it.
                let policy = crossing.policies.current().ok_or_else(no_policy)?;
                let vendor_purpose =
                    policy.tcf_vendor_purpose(&request.destination_kind, &request.purpose);
                // Owed before the page is decided on: a page that fails
                // is recorded as aborted.
                let mut page_audit = audited(&policy.version);
                // A new filter per page: its age bands are for the day the
                // page crosses.
                let mut filter = Filter::new(
                    policy,
                    crossing.pseudonymiser.clone(),
                    &request.destination_id,
                    &request.destination_kind,
                    &request.purpose,
                );
                let crossed = crossing
                    .cross_changes(&mut filter, page.changes, &request.purpose, vendor_purpose.as_deref(), freshness, deadline)
                    .await?;
                page_audit.ledger.record(filter.settle());
                // Released only once its audit record is durable.
                page_audit.record("released").await?;
                pages += 1;
                yield segments_pb::ExportAudienceChangesResponse { changes: crossed };
            }
            // A call that released nothing is on record too.
            if pages == 0 {
                audited(&started_under).record("complete").await?;
            }
        };
        let mut response = Response::new(Box::pin(stream) as Changes);
        name_policy_version(&mut response, &policy.version);
        Ok(response)
    }

    /// One page of changes as it crosses: entered members the policy lets
    /// through, minimised; everyone else as a pseudonymous id not in the
    /// audience.
    async fn cross_changes(
        &self,
        filter: &mut Filter,
        changes: Vec<segments_pb::AudienceChange>,
        purpose: &str,
        vendor_purpose: Option<&str>,
        freshness: crate::consent_view::Freshness,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Vec<segments_pb::AudienceChange>, Status> {
        let entering: Vec<&segments_pb::AudienceMember> = changes
            .iter()
            .filter(|change| change.in_audience)
            .filter_map(|change| change.member.as_ref())
            .collect();
        let states = if entering.is_empty() {
            Vec::new()
        } else {
            self.consent_states(&entering, purpose, vendor_purpose, freshness, deadline)
                .await?
        };
        let mut states = states.into_iter();
        let mut crossed = Vec::with_capacity(changes.len());
        for change in changes {
            let Some(member) = change.member else {
                return Err(Status::internal(
                    "the segments service sent an audience change without a member",
                ));
            };
            let admitted = if change.in_audience {
                let state = states
                    .next()
                    .ok_or_else(|| Status::internal("consent states do not match the changes"))?;
                filter
                    .admit(&MemberView::of(&member), state)
                    .map_err(policy_failure)?
                    .cloned()
            } else {
                None
            };
            let (in_audience, member) = match admitted {
                Some(member) => (true, member),
                None => (
                    false,
                    segments_pb::AudienceMember {
                        pseudonymous_id: filter.leave(&member.profile_id),
                        ..Default::default()
                    },
                ),
            };
            crossed.push(segments_pb::AudienceChange {
                cursor: change.cursor,
                in_audience,
                at: change.at,
                member: Some(member),
            });
        }
        Ok(crossed)
    }
}
