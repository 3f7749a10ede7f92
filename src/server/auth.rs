//! Who is calling: `Authorization: Bearer <key>` resolved to a [`Caller`].

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use subtle::ConstantTimeEq;

use super::AppState;
use super::error::ApiError;
use crate::secrets::hash_key;

/// The authenticated caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// The admin key.
    Admin,
    /// The ad-server key.
    AdServer,
    /// An advertiser's key.
    Advertiser(u64),
    /// No `Authorization` header.
    Anonymous,
}

impl Caller {
    /// Only the admin may.
    pub fn require_admin(self) -> Result<(), ApiError> {
        match self {
            Caller::Admin => Ok(()),
            Caller::Anonymous => Err(ApiError::unauthorized("an admin key is required")),
            _ => Err(ApiError::forbidden("this operation needs the admin key")),
        }
    }

    /// The admin or the ad server may.
    pub fn require_ad_server(self) -> Result<(), ApiError> {
        match self {
            Caller::Admin | Caller::AdServer => Ok(()),
            Caller::Anonymous => Err(ApiError::unauthorized("the ad-server key is required")),
            Caller::Advertiser(_) => Err(ApiError::forbidden(
                "this operation needs the ad-server key",
            )),
        }
    }

    /// The admin or the given advertiser may read; anyone else is told the object does
    /// not exist, so ids of other tenants leak nothing.
    pub fn require_reader_of(self, owner: Option<u64>, what: &str) -> Result<(), ApiError> {
        match (self, owner) {
            (Caller::Anonymous, _) => Err(ApiError::unauthorized("an API key is required")),
            (Caller::Admin, Some(_)) => Ok(()),
            (Caller::Advertiser(me), Some(owner)) if me == owner => Ok(()),
            _ => Err(ApiError::not_found(what)),
        }
    }
}

fn eq(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Caller, ApiError> {
        let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
            return Ok(Caller::Anonymous);
        };
        let key = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or_else(|| ApiError::unauthorized("expected Authorization: Bearer <key>"))?;
        if eq(key, &state.secrets.admin_key) {
            return Ok(Caller::Admin);
        }
        if eq(key, &state.secrets.ad_server_key) {
            return Ok(Caller::AdServer);
        }
        let hash = hash_key(key);
        if let Some(id) = state.advertiser_keys.read().get(&hash) {
            return Ok(Caller::Advertiser(*id));
        }
        let store = state.store.clone();
        let found = super::blocking(move || store.advertiser_for_key(&hash)).await?;
        match found {
            Some(id) => {
                state.advertiser_keys.write().insert(hash, id);
                Ok(Caller::Advertiser(id))
            }
            None => Err(ApiError::unauthorized("unknown API key")),
        }
    }
}
