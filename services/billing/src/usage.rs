//! Usage events: what a region reports about an account's billable use.
//!
//! A region emits an event for each change (an instance started, reset to another image,
//! terminated; the account's total snapshot bytes in the region changed). Each event has an id
//! unique across the fleet, `(region, seq)`, so that a store can keep it idempotently and the
//! rating engine can drop a second delivery. Events may arrive in any order; rating sorts them
//! by time, then by id.

use serde::{Deserialize, Serialize};

/// The fleet-wide identity of an event: the emitting region and its sequence number there.
/// The region is also the region of the usage.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EventId {
    pub region: String,
    pub seq: u64,
}

/// What a root image costs to launch from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RootKind {
    /// Free everywhere (every public image but Windows and the licensed ones).
    Free,
    /// A Windows image: free in mainland regions, billed per instance-hour by instance type
    /// overseas.
    Windows,
    /// A commercial licence (RHEL-style): billed per instance-hour by vCPU class in every
    /// region.
    Licensed,
}

impl RootKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RootKind::Free => "FREE",
            RootKind::Windows => "WINDOWS",
            RootKind::Licensed => "LICENSED",
        }
    }
}

/// One image of a lineage chain, with where it lives and whose it is when known.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LineageLink {
    pub image_id: String,
    pub region: Option<String>,
    pub owner: Option<String>,
}

impl LineageLink {
    pub fn new(image_id: impl Into<String>) -> LineageLink {
        LineageLink {
            image_id: image_id.into(),
            region: None,
            owner: None,
        }
    }

    pub fn at(mut self, region: impl Into<String>, owner: impl Into<String>) -> LineageLink {
        self.region = Some(region.into());
        self.owner = Some(owner.into());
        self
    }
}

/// The image an instance runs, as far as billing is concerned: the image, the lineage that
/// leads from it to its ultimate source, and what that source costs.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ImageCharge {
    /// The image the instance was launched from (or reset to).
    pub image_id: String,
    /// The lineage from `image_id` (first) back to the root (last), every derivation in
    /// between: CreateImage from an instance, a copy to another region, a share.
    pub chain: Vec<LineageLink>,
    /// The ultimate source (the last image of `chain`).
    pub root_image_id: String,
    pub root_kind: RootKind,
}

impl ImageCharge {
    /// A charge for an image given its chain (launched image first, root last); the image and
    /// root ids are taken from the chain. `None` for an empty chain.
    pub fn from_chain(chain: Vec<LineageLink>, root_kind: RootKind) -> Option<ImageCharge> {
        let image_id = chain.first()?.image_id.clone();
        let root_image_id = chain.last()?.image_id.clone();
        Some(ImageCharge {
            image_id,
            chain,
            root_image_id,
            root_kind,
        })
    }

    /// Whether the chain leads from `image_id` to `root_image_id` (an empty chain says
    /// nothing and is consistent).
    pub fn is_consistent(&self) -> bool {
        match (self.chain.first(), self.chain.last()) {
            (Some(first), Some(last)) => {
                first.image_id == self.image_id && last.image_id == self.root_image_id
            }
            _ => true,
        }
    }

    /// A charge for a root image itself (a public image).
    pub fn root(image_id: impl Into<String>, root_kind: RootKind) -> ImageCharge {
        let image_id = image_id.into();
        ImageCharge {
            chain: vec![LineageLink::new(image_id.clone())],
            root_image_id: image_id.clone(),
            image_id,
            root_kind,
        }
    }
}

/// What happened.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Usage {
    /// An instance began running (launched, or started again after a termination event).
    InstanceStarted {
        instance_id: String,
        instance_type: String,
        vcpu: u32,
        image: ImageCharge,
    },
    /// The instance was reset to another image (ResetInstance); it keeps running.
    InstanceImageChanged {
        instance_id: String,
        image: ImageCharge,
    },
    /// The instance stopped running.
    InstanceTerminated { instance_id: String },
    /// The account's total snapshot bytes in the event's region, from the event's time on.
    SnapshotBytesHeld { bytes: u64 },
}

/// One usage event.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct UsageEvent {
    pub id: EventId,
    /// Unix seconds (UTC).
    pub at: i64,
    pub account: String,
    pub usage: Usage,
}

impl UsageEvent {
    /// The region the usage happened in (the emitting region).
    pub fn region(&self) -> &str {
        &self.id.region
    }
}
