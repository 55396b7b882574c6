"""Metric helpers the tasks share (each task's own metric is its `score` and `aggregate`, vcr1/tasks)."""
from vcr1 import rewards


def percent(values) -> float:
    """Mean of `values` in percent (metrics are reported as the paper does)."""
    values = list(values)
    return 100.0 * sum(values) / len(values)


def blind_span_baseline(train: list, test: list, grid: int = 20) -> dict:
    """mIoU (percent) on `test` of the best answer that ignores the video: the one span
    [a·duration, b·duration], a < b on a 1/grid lattice of [0, 1], that scores best on `train`.

    Items are (duration, ground-truth intervals): one span or a list, scored by the IoU of merged intervals
    (for one interval, the temporal IoU). A model's temporal mIoU shows that it reads time from the video
    only as far as it is above this figure.
    """
    def miou(a, b, items):
        return percent([rewards.intervals_iou([[a * d, b * d]], spans) for d, spans in items])

    if not train or not test:
        raise ValueError("blind_span_baseline needs train and test items")
    lattice = [(i / grid, j / grid) for i in range(grid) for j in range(i + 1, grid + 1)]
    a, b = max(lattice, key=lambda ab: miou(*ab, train))
    return {"start": a, "end": b, "mIoU": miou(a, b, test)}
