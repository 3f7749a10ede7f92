//! The registered views. Add a view: one file here, one line in `VIEWS`, one test
//! (see `docs/adding-a-view.md`). The list is static so the compiler checks it.

use crate::views::ViewDef;

pub mod ad_clicks;
pub mod ad_hourly_users;
pub mod fraud_adjustments;
pub mod late_clicks;

/// Every view the dataflow builds and the sink stores.
pub static VIEWS: &[ViewDef] = &[
    ad_clicks::VIEW,
    late_clicks::VIEW,
    ad_hourly_users::VIEW,
    fraud_adjustments::VIEW,
];
