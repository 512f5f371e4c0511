"""RedNet models; importing this package registers rednet26/38/50/101/152 with timm."""

from rednet.models.involution import Involution
from rednet.models.rednet import Bottleneck, RedNet

__all__ = ["Bottleneck", "Involution", "RedNet"]
