"""The anchor-free head on hand-checkable cases: decode, SimOTA assignment, loss, and learning."""

import math

import torch

from csref_model.boxes import box_iou, cxcywh_to_xyxy
from csref_model.head import SRECHead, decode_best_box, simota_assign


def raw_maps(grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(1, 4, grid, grid), torch.zeros(1, 1, grid, grid)


def test_decode_picks_best_cell_without_half_cell_offset():
    reg, obj = raw_maps(5)
    obj[0, 0, 2, 3] = 4.0  # row 2, col 3
    reg[0, :, 2, 3] = torch.tensor([0.25, 0.5, 0.0, math.log(2.0)])
    box = decode_best_box(reg, obj)[0]
    # centre ((0.25 + 3) * 32, (0.5 + 2) * 32) = (104, 80), size (32, 64)
    expected = torch.tensor([88.0, 48.0, 120.0, 112.0, torch.sigmoid(torch.tensor(4.0)).item()])
    torch.testing.assert_close(box, expected)


def test_decode_takes_first_cell_on_ties():
    reg, obj = raw_maps(3)
    obj[0, 0, 1, 2] = 2.0  # flat index 5
    obj[0, 0, 2, 0] = 2.0  # flat index 6, same score
    box = decode_best_box(reg, obj)[0]
    # cell (row 1, col 2): centre (64, 32), size 32 x 32
    torch.testing.assert_close(box[:4], torch.tensor([48.0, 16.0, 80.0, 48.0]))


def cell_centred_predictions(grid: int, width: float, height: float) -> torch.Tensor:
    """Every cell predicts a width x height box centred on the cell centre: (G*G, 4) cx, cy, w, h."""
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    centres = (torch.stack([cols, rows], -1).view(-1, 2).float() + 0.5) * 32
    return torch.cat([centres, torch.tensor([[width, height]]).expand(grid * grid, 2)], dim=1)


def test_simota_single_positive_is_the_cell_holding_the_gt_centre():
    # 4x4 grid (128 px). GT 40x40 centred at (48, 48), inside cell (row 1, col 1) whose prediction
    # matches it exactly (IoU 1); the 4 side neighbours overlap 8x40 (IoU 320/2880 = 0.111), the
    # 4 diagonals 8x8 (IoU 64/3136 = 0.020), the rest 0. Sum of the top 10 IoUs = 1.53 -> k = 1.
    predictions = cell_centred_predictions(4, 40.0, 40.0)
    matched = simota_assign(predictions, torch.tensor([[48.0, 48.0, 40.0, 40.0]]), grid_size=4)
    assert (matched >= 0).nonzero().flatten().tolist() == [1 * 4 + 1]
    assert matched[1 * 4 + 1] == 0


def test_simota_k_grows_with_overlap_and_prefers_in_box_cells():
    # GT 96x96 at (60, 70). Cell centres 16/48/80/112: the GT spans x (12, 108), y (22, 118), so
    # cols 0-2 and rows 1-3 are in the box. IoU = (96-dx)(96-dy) / (2*96^2 - overlap): the best are
    # (row 2, col 1) 0.645 (offsets 12, 10), (row 2, col 2) 0.549 (20, 10), (row 1, col 1) 0.509
    # (12, 22), (row 1, col 2) 0.439 (20, 22), then <= 0.33; the top-10 sum is 3.83 -> k = 3,
    # the three cheapest (highest-IoU) in-box cells.
    predictions = cell_centred_predictions(4, 96.0, 96.0)
    matched = simota_assign(predictions, torch.tensor([[60.0, 70.0, 96.0, 96.0]]), grid_size=4)
    assert sorted((matched >= 0).nonzero().flatten().tolist()) == [1 * 4 + 1, 2 * 4 + 1, 2 * 4 + 2]


def test_simota_assigns_each_gt_box_its_own_cells():
    # Two 40x40 boxes centred on cells (1, 1) and (6, 6) of an 8x8 grid: each gets exactly the cell
    # under its centre (k = 1, as in the single-box case), and no cell serves both.
    predictions = cell_centred_predictions(8, 40.0, 40.0)
    gt = torch.tensor([[48.0, 48.0, 40.0, 40.0], [208.0, 208.0, 40.0, 40.0]])
    matched = simota_assign(predictions, gt, grid_size=8)
    assert (matched >= 0).nonzero().flatten().tolist() == [1 * 8 + 1, 6 * 8 + 6]
    assert matched[1 * 8 + 1] == 0 and matched[6 * 8 + 6] == 1


def test_simota_cell_wanted_by_two_gt_boxes_goes_to_the_cheaper():
    # Two identical-size boxes whose centres both lie in cell (1, 1); the cell's prediction (a
    # 40x40 box at the cell centre) matches the first box exactly, the second (shifted 6 px) less.
    predictions = cell_centred_predictions(4, 40.0, 40.0)
    gt = torch.tensor([[54.0, 48.0, 40.0, 40.0], [48.0, 48.0, 40.0, 40.0]])
    matched = simota_assign(predictions, gt, grid_size=4)
    assert matched[1 * 4 + 1] == 1


def test_simota_without_gt_boxes_has_no_positives():
    matched = simota_assign(cell_centred_predictions(4, 40.0, 40.0), torch.zeros(0, 4), grid_size=4)
    assert (matched == -1).all()


def test_loss_on_perfect_single_positive_is_objectness_only():
    # Same layout as the k = 1 case: the positive's box equals the GT (IoU loss 0) and every
    # objectness logit is 0, so the loss is 16 cells x BCE(0, target) = 16 ln 2 over 1 positive.
    head = SRECHead(in_channels=8, hidden_channels=8)
    reg, obj = raw_maps(4)
    reg[0, :2] = 0.5  # centre of each cell
    reg[0, 2:] = math.log(40.0 / 32.0)
    loss = head.loss(reg, obj, torch.tensor([[48.0, 48.0, 40.0, 40.0]]) / 128)
    torch.testing.assert_close(loss, torch.tensor(16 * math.log(2.0)))


def test_head_learns_a_fixed_batch():
    torch.manual_seed(0)
    head = SRECHead(in_channels=8, hidden_channels=16)
    features = torch.randn(2, 8, 4, 4)
    targets = torch.tensor([[0.40, 0.35, 0.30, 0.25], [0.70, 0.60, 0.20, 0.40]])
    optimizer = torch.optim.Adam(head.parameters(), lr=1e-2)
    losses = []
    for _ in range(60):
        loss = head(features, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0], losses
    with torch.no_grad():
        boxes = head(features)  # train-mode BatchNorm, same statistics as during the steps
    gt_xyxy = cxcywh_to_xyxy(targets * 128)
    assert (box_iou(boxes[:, :4], gt_xyxy) > 0.5).all(), boxes
