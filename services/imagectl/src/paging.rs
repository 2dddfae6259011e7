//! `--all`: following `next_page_token` until a list is exhausted.

use crate::error::{CliError, Result};
use std::future::Future;

/// One page of a list: its items, the total count and the token of the next page.
pub struct Page<T> {
    pub items: Vec<T>,
    pub total_count: u32,
    pub next_page_token: String,
}

/// Every item of a list, fetching pages with `fetch(page_token)` (the first with an empty
/// token) until the server returns no next token. Returns the items and the last total count.
pub async fn collect_all<T, F, Fut>(mut fetch: F) -> Result<(Vec<T>, u32)>
where
    F: FnMut(String) -> Fut,
    Fut: Future<Output = Result<Page<T>>>,
{
    let mut items = Vec::new();
    let mut token = String::new();
    loop {
        let page = fetch(token.clone()).await?;
        items.extend(page.items);
        if page.next_page_token.is_empty() {
            return Ok((items, page.total_count));
        }
        if page.next_page_token == token {
            return Err(CliError::Failed(format!(
                "the server returned the same page token twice ({token}); stopping"
            )));
        }
        token = page.next_page_token;
    }
}

/// A list request whose later pages are asked for by token.
pub trait PagedRequest: Clone {
    /// The same request for the page `token` names (the token takes the place of the offset).
    fn at_token(self, token: String) -> Self;
}

/// A list response, seen as a page of items.
pub trait PagedResponse: Sized {
    type Item;
    fn into_page(self) -> Page<Self::Item>;
    /// The response holding a whole list.
    fn from_items(items: Vec<Self::Item>, total_count: u32) -> Self;
}

/// One list call with `call`, or with `all` every page of it, as one response.
pub async fn list<Req, Resp, F, Fut>(request: Req, all: bool, mut call: F) -> Result<Resp>
where
    Req: PagedRequest,
    Resp: PagedResponse,
    F: FnMut(Req) -> Fut,
    Fut: Future<Output = Result<Resp>>,
{
    if !all {
        return call(request).await;
    }
    let (items, total_count) = collect_all(|token: String| {
        let page_request = if token.is_empty() {
            request.clone()
        } else {
            request.clone().at_token(token)
        };
        let response = call(page_request);
        async move { Ok(response.await?.into_page()) }
    })
    .await?;
    Ok(Resp::from_items(items, total_count))
}

macro_rules! paged {
    ($request:ty, $response:ty, $items:ident, $item:ty) => {
        impl PagedRequest for $request {
            fn at_token(mut self, token: String) -> Self {
                self.offset = 0;
                self.page_token = token;
                self
            }
        }

        impl PagedResponse for $response {
            type Item = $item;
            fn into_page(self) -> Page<$item> {
                Page {
                    items: self.$items,
                    total_count: self.total_count,
                    next_page_token: self.next_page_token,
                }
            }
            fn from_items(items: Vec<$item>, total_count: u32) -> Self {
                Self {
                    $items: items,
                    total_count,
                    next_page_token: String::new(),
                }
            }
        }
    };
}

use imagefleet_proto::region::v1 as region;
paged!(
    region::DescribeImagesRequest,
    region::DescribeImagesResponse,
    image_set,
    region::Image
);
paged!(
    region::DescribeInstancesRequest,
    region::DescribeInstancesResponse,
    instance_set,
    region::Instance
);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pages_are_followed_until_the_token_is_empty() {
        let mut asked = Vec::new();
        let (items, total) = collect_all(|token: String| {
            asked.push(token.clone());
            async move {
                Ok(match token.as_str() {
                    "" => Page {
                        items: vec![1, 2],
                        total_count: 5,
                        next_page_token: "p2".into(),
                    },
                    "p2" => Page {
                        items: vec![3, 4],
                        total_count: 5,
                        next_page_token: "p3".into(),
                    },
                    _ => Page {
                        items: vec![5],
                        total_count: 5,
                        next_page_token: String::new(),
                    },
                })
            }
        })
        .await
        .expect("collected");
        assert_eq!(items, [1, 2, 3, 4, 5]);
        assert_eq!(total, 5);
        assert_eq!(asked, ["", "p2", "p3"]);
    }

    #[tokio::test]
    async fn a_repeated_token_stops_the_loop() {
        let result = collect_all(|_token: String| async {
            Ok(Page {
                items: vec![1],
                total_count: 9,
                next_page_token: "same".into(),
            })
        })
        .await;
        assert!(result.is_err());
    }
}
