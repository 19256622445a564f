"""Two models' maps of one width drawn in one PCA basis, so a colour means one direction.

Two checkpoints of one architecture (a fine-tuned model and its start, two epochs) have
layers whose channels correspond: channel ``c`` of model A and channel ``c`` of model B
are the same unit, trained further. One PCA basis fitted over the pixels of both layers'
maps, with one colour scale, draws both: the same colour is the same direction of the
shared channel space in both pictures, so a change of colour is a change of
representation. (For unrelated architectures of equal width the channels do not
correspond and a joint basis has no such meaning; pictures then use a basis each.)

Example:
    >>> a, b = torch.rand(4, 64, 14, 14), torch.rand(4, 64, 7, 7)
    >>> rgb_a, rgb_b = joint_pca(a, b)
    >>> rgb_a.shape, rgb_b.shape
    ((4, 14, 14, 3), (4, 7, 7, 3))
"""

from __future__ import annotations

from ..pca import joint_basis, joint_pca

__all__ = ["joint_basis", "joint_pca"]
