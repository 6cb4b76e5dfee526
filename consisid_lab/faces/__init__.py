"""Real-face tools: MediaPipe face analysis, insightface ArcFace, EVA-CLIP through open_clip, CurricularFace.

Heavy libraries (mediapipe, insightface, onnx, open_clip) are imported inside the functions that need them, so
importing this package stays cheap.
"""

from consisid_lab.faces.analysis import FaceAnalyzer, FaceInfo, NoFaceError, align_face, parse_face, select_face

__all__ = ["FaceAnalyzer", "FaceInfo", "NoFaceError", "align_face", "parse_face", "select_face"]
