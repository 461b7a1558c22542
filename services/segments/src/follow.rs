//! Keeps the projection fed from the profiles change stream: resume after
//! the projection's cursor, apply what arrives in pages (each page and its
//! cursor in one transaction), re-evaluate the people a page touched
//! against every segment (real-time membership), reconnect with backoff
//! after any failure.

use std::collections::BTreeSet;
use std::sync::Arc;

use futures::StreamExt;
use madtech_common::CancellationToken;
use madtech_common::changelog::{Backoff, keep_following};
use madtech_common::upstream::Upstream;
use madtech_proto::profiles::v1 as profiles_pb;
use profiles_pb::profile_service_client::ProfileServiceClient;

use crate::convert::change_from_pb;
use crate::error::SegmentError;
use crate::evaluate::Evaluator;
use crate::store::projection::Projection;

/// Changes applied per transaction at most.
const PAGE: usize = 512;

/// Follows the stream until `shutdown`.
pub async fn follow(
    projection: Arc<Projection>,
    evaluator: Evaluator,
    client: ProfileServiceClient<Upstream>,
    shutdown: CancellationToken,
) {
    keep_following("profile changes", shutdown, |backoff| {
        let (projection, evaluator, mut client) =
            (Arc::clone(&projection), evaluator.clone(), client.clone());
        async move { follow_once(&projection, &evaluator, &mut client, &backoff).await }
    })
    .await;
}

async fn follow_once(
    projection: &Projection,
    evaluator: &Evaluator,
    client: &mut ProfileServiceClient<Upstream>,
    backoff: &Backoff,
) -> Result<(), SegmentError> {
    let cursor = projection.cursor().await?;
    // What was applied before is as evaluated as it will be (a re-evaluation
    // lost with a stopped process waits for the next computation).
    evaluator.evaluated_through(cursor);
    let stream = client
        .watch_profile_changes(profiles_pb::WatchProfileChangesRequest {
            after_cursor: cursor,
        })
        .await
        .map_err(SegmentError::Profiles)?
        .into_inner();
    let mut pages = stream.ready_chunks(PAGE);
    while let Some(page) = pages.next().await {
        let mut changes = Vec::with_capacity(page.len());
        let mut last = None;
        for item in page {
            let change = item
                .map_err(SegmentError::Profiles)?
                .change
                .ok_or_else(|| SegmentError::Corrupt("an empty profile change".into()))?;
            let cursor = change.cursor;
            last = Some(cursor);
            changes.extend(change_from_pb(change).map(|c| (cursor, c)));
        }
        if let Some(last) = last {
            projection.apply(&changes).await?;
            backoff.reset();
            let touched: BTreeSet<&str> = changes.iter().flat_map(|(_, c)| c.touched()).collect();
            let touched: Vec<String> = touched.into_iter().map(String::from).collect();
            // The projection is already ahead: a failure here is logged and
            // the next computation (or change) repairs the memberships.
            if let Err(err) = evaluator.reevaluate(&touched).await {
                tracing::warn!(error = %err, people = touched.len(), "real-time re-evaluation failed");
            }
            evaluator.evaluated_through(last);
        }
    }
    Ok(())
}
