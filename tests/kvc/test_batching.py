import queue

from kvc.batching import take_batch


def test_a_batch_stops_at_items_bytes_or_the_stop_marker():
    q = queue.Queue()
    for x in (5, 5, 5, 5):
        q.put(x)
    assert take_batch(q, 5, 10, 12, lambda x: x) == [5, 5, 5]  # 15 >= 12 bytes: stop
    assert take_batch(q, 1, 2, 100, lambda x: x) == [1, 5]       # 2 items
    q = queue.Queue()
    q.put(7)
    q.put(None)
    q.put(9)
    assert take_batch(q, 1, 10, 100, lambda x: x) == [1, 7]      # the marker ends it and goes back
    assert q.get_nowait() == 9 and q.get_nowait() is None
