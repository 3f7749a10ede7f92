//! `GET /dashboard`: the advertiser dashboard. One self-contained HTML page (inline CSS,
//! vanilla JS, an SVG chart) compiled into the binary, so there is no asset build and
//! nothing to deploy beside the query server. The page reads only the public API, with
//! the key the user types (kept in the tab's sessionStorage); see `docs/dashboard.md`.

use std::sync::OnceLock;

use axum::http::header;
use axum::response::IntoResponse;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest, Sha256};

/// The page, as committed in `dashboard.html`.
pub const PAGE: &str = include_str!("dashboard.html");

/// The page's one inline script, between `<script>` and `</script>`.
fn inline_script(page: &str) -> Option<&str> {
    let start = page.find("<script>")? + "<script>".len();
    let end = start + page[start..].find("</script>")?;
    Some(&page[start..end])
}

/// The Content-Security-Policy: only the page's own script (by hash) runs, and it may
/// talk only to this origin, so neither injected markup nor a third party ever sees the
/// key.
fn policy() -> &'static str {
    static POLICY: OnceLock<String> = OnceLock::new();
    POLICY.get_or_init(|| {
        let script = inline_script(PAGE)
            .map(|s| format!("'sha256-{}'", STANDARD.encode(Sha256::digest(s.as_bytes()))))
            .unwrap_or_else(|| "'none'".to_owned());
        format!(
            "default-src 'none'; script-src {script}; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'"
        )
    })
}

/// `GET /dashboard`.
pub async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, policy()),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_allows_exactly_the_inline_script() {
        let script = inline_script(PAGE).expect("the page has an inline script");
        assert!(
            script.contains("async function refresh"),
            "the whole script"
        );
        assert_eq!(
            PAGE.matches("<script").count(),
            1,
            "one script, no external ones"
        );
        let hash = STANDARD.encode(Sha256::digest(script.as_bytes()));
        assert!(policy().contains(&format!("script-src 'sha256-{hash}';")));
        assert!(policy().contains("connect-src 'self'"));
    }

    #[test]
    fn the_page_carries_the_test_hooks() {
        for hook in [
            "total-billable",
            "total-fraud",
            "total-late",
            "top-ads",
            "login-error",
            "scope",
        ] {
            assert!(PAGE.contains(&format!("data-testid=\"{hook}\"")), "{hook}");
        }
    }
}
