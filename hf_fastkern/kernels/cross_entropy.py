"""PLACEHOLDER (being replaced by the kernel): cross-entropy entry points with their final signatures."""
from hf_fastkern.kernels import reference


def fused_linear_cross_entropy(hidden, weight, labels, bias=None, *, ignore_index=-100, reduction="mean",
                               label_smoothing=0.0, z_loss=0.0, softcap=None, num_items_in_batch=None):
    return reference.linear_cross_entropy(hidden, weight, labels, bias, ignore_index=ignore_index,
                                          reduction=reduction, label_smoothing=label_smoothing, z_loss=z_loss,
                                          softcap=softcap, num_items_in_batch=num_items_in_batch)


def cross_entropy(logits, labels, *, ignore_index=-100, reduction="mean", label_smoothing=0.0, z_loss=0.0,
                  softcap=None, num_items_in_batch=None):
    return reference.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction,
                                   label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap,
                                   num_items_in_batch=num_items_in_batch)
