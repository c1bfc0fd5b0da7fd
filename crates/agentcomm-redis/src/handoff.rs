//! The buffer between a stream subscription's readers and its subscriber.
//!
//! A read brings up to `read_batch` entries at a time. Handing them to the subscriber one by one
//! through a general channel cost some 1,200 instructions a message (its listeners and their
//! notifications, on both sides); here a reader hands over a whole batch under one lock, wakes the
//! subscriber only if it waits, and the subscriber takes everything that waits under one lock too.
//! There is one subscriber (a [`Receiver`]) per buffer.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use futures::Stream;

/// The shared half: readers push, [`Receiver`] takes.
pub(crate) struct Handoff<T> {
    state: Mutex<State<T>>,
    /// Whether the subscriber waits for something to come (a copy of `state.waker.is_some()` that a
    /// reader can read without the lock, to decide whether to hand over what it has at once).
    waiting: AtomicBool,
}

struct State<T> {
    queue: VecDeque<T>,
    waker: Option<Waker>,
    /// No more sends: the subscriber reads what waits, then its stream ends.
    closed: bool,
    /// The [`Receiver`] was dropped: nobody reads what waits.
    gone: bool,
}

impl<T> Handoff<T> {
    /// An empty buffer and the one receiver that reads it; `on_drop` runs when the receiver is
    /// dropped (after it put back what it had taken and not yielded).
    pub(crate) fn new(on_drop: impl FnOnce() + Send + 'static) -> (Arc<Self>, Receiver<T>) {
        let handoff = Arc::new(Handoff {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                waker: None,
                closed: false,
                gone: false,
            }),
            waiting: AtomicBool::new(false),
        });
        let receiver = Receiver {
            handoff: handoff.clone(),
            taken: VecDeque::new(),
            on_drop: Some(Box::new(on_drop)),
        };
        (handoff, receiver)
    }

    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Nothing here panics while holding the lock; a poisoned lock still holds a consistent queue.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Appends `items` in their order and wakes the subscriber if it waits. When the buffer is closed
    /// or its receiver gone, nothing is appended and every item comes back, in order.
    pub(crate) fn send_all(&self, items: Vec<T>) -> Result<(), Vec<T>> {
        if items.is_empty() {
            return Ok(());
        }
        let waker = {
            let mut state = self.lock();
            if state.closed || state.gone {
                return Err(items);
            }
            state.queue.extend(items);
            self.waiting.store(false, Ordering::Release);
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
        Ok(())
    }

    /// Whether the subscriber waits for something to come: a reader holding items hands them over
    /// at once then, rather than at the end of its batch.
    pub(crate) fn subscriber_waits(&self) -> bool {
        self.waiting.load(Ordering::Acquire)
    }

    /// Stops sends; the subscriber reads what waits, then its stream ends.
    pub(crate) fn close(&self) {
        let waker = {
            let mut state = self.lock();
            state.closed = true;
            state.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Once the receiver is gone, what waited for it, in order (nobody will read it); before, nothing.
    pub(crate) fn take_unread(&self) -> Vec<T> {
        let mut state = self.lock();
        if state.gone {
            state.queue.drain(..).collect()
        } else {
            Vec::new()
        }
    }

    /// How many items wait in the shared half (not counting those a receiver took and holds).
    fn queued(&self) -> usize {
        self.lock().queue.len()
    }
}

/// The subscriber's half: a stream of what the readers handed over, in order, that ends once the
/// buffer is closed and everything in it was read.
pub(crate) struct Receiver<T> {
    handoff: Arc<Handoff<T>>,
    /// Taken from the shared half in one go, yielded one by one.
    taken: VecDeque<T>,
    on_drop: Option<Box<dyn FnOnce() + Send>>,
}

// Items are moved in and out, never pinned in place.
impl<T> Unpin for Receiver<T> {}

impl<T> Stream for Receiver<T> {
    type Item = T;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let this = self.get_mut();
        // Each item spends a unit of the task's cooperative budget, as Tokio's own channels do: a
        // subscriber that always finds something waiting still gives its thread back now and then.
        let coop = std::task::ready!(tokio::task::coop::poll_proceed(cx));
        if let Some(item) = this.taken.pop_front() {
            coop.made_progress();
            return Poll::Ready(Some(item));
        }
        let mut state = this.handoff.lock();
        if !state.queue.is_empty() {
            std::mem::swap(&mut this.taken, &mut state.queue);
            drop(state);
            coop.made_progress();
            return Poll::Ready(this.taken.pop_front());
        }
        if state.closed {
            return Poll::Ready(None);
        }
        match &mut state.waker {
            Some(waker) => waker.clone_from(cx.waker()),
            None => state.waker = Some(cx.waker().clone()),
        }
        this.handoff.waiting.store(true, Ordering::Release);
        Poll::Pending
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.taken.len() + self.handoff.queued(), None)
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        {
            let mut state = self.handoff.lock();
            // What this receiver took and did not yield goes back in front, in order, for whoever
            // gives back what nobody will read.
            while let Some(item) = self.taken.pop_back() {
                state.queue.push_front(item);
            }
            state.gone = true;
            state.waker = None;
            self.handoff.waiting.store(false, Ordering::Release);
        }
        if let Some(on_drop) = self.on_drop.take() {
            on_drop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    #[tokio::test]
    async fn items_arrive_in_order_across_batches_and_the_stream_ends_after_close() {
        let (handoff, mut receiver) = Handoff::new(|| {});
        handoff.send_all(vec![1, 2, 3]).unwrap();
        assert_eq!(receiver.next().await, Some(1));
        handoff.send_all(vec![4]).unwrap();
        assert_eq!(receiver.size_hint().0, 3, "two taken, one still shared");
        handoff.close();
        assert_eq!(handoff.send_all(vec![5]), Err(vec![5]), "closed: refused");
        let rest: Vec<i32> = receiver.collect().await;
        assert_eq!(rest, vec![2, 3, 4]);
    }

    #[tokio::test]
    async fn a_waiting_subscriber_is_woken_and_says_it_waits() {
        let (handoff, mut receiver) = Handoff::new(|| {});
        assert!(!handoff.subscriber_waits());
        let reading = tokio::spawn(async move { receiver.next().await });
        tokio::time::timeout(Duration::from_secs(5), async {
            while !handoff.subscriber_waits() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the subscriber waits");
        handoff.send_all(vec![7]).unwrap();
        assert!(!handoff.subscriber_waits(), "woken");
        let got = tokio::time::timeout(Duration::from_secs(5), reading)
            .await
            .expect("woken in time")
            .unwrap();
        assert_eq!(got, Some(7));
    }

    #[tokio::test]
    async fn a_dropped_receiver_puts_back_what_it_took_and_refuses_more() {
        let dropped = Arc::new(AtomicUsize::new(0));
        let (handoff, mut receiver) = {
            let dropped = dropped.clone();
            Handoff::new(move || {
                dropped.fetch_add(1, Ordering::SeqCst);
            })
        };
        handoff.send_all(vec![1, 2, 3]).unwrap();
        assert_eq!(receiver.next().await, Some(1));
        handoff.send_all(vec![4]).unwrap();
        assert!(handoff.take_unread().is_empty(), "still read by someone");
        drop(receiver);
        assert_eq!(dropped.load(Ordering::SeqCst), 1);
        assert_eq!(handoff.send_all(vec![5]), Err(vec![5]));
        assert_eq!(handoff.take_unread(), vec![2, 3, 4]);
        assert!(handoff.take_unread().is_empty());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_subscriber_that_always_finds_items_still_yields_its_thread() {
        let (handoff, mut receiver) = Handoff::new(|| {});
        handoff.send_all((0..10_000).collect()).unwrap();
        // Closed: the stream ends after the last item rather than waiting for more.
        handoff.close();
        let other_ran = Arc::new(AtomicBool::new(false));
        let other = {
            let other_ran = other_ran.clone();
            tokio::spawn(async move { other_ran.store(true, Ordering::SeqCst) })
        };
        let mut read = 0;
        while receiver.next().await.is_some() {
            read += 1;
            if other_ran.load(Ordering::SeqCst) {
                break;
            }
        }
        assert!(
            read < 10_000,
            "another task ran before the subscriber read everything"
        );
        other.await.unwrap();
    }
}
