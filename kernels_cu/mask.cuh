// The attention kernels' `int mask_kind` argument (ops/softmax.py's MaskKind): no mask; an additive mask (T
// values added to the scores); a boolean mask (bytes; a key is dropped where 0).
#pragma once

namespace ct {

enum MaskKind : int { NO_MASK = 0, ADDITIVE_MASK = 1, BOOL_MASK = 2 };

}  // namespace ct
