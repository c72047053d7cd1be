"""Taking a trained model out of the experiment: loading it from any file, exporting it, predicting.

`source` reads a run checkpoint, an official `.npz` or a timm file into one
`ModelSource`; `preprocess` is the model's evaluation transform as one value that an
export writes to `preprocess.json`; `labels` names the classes; `predict` classifies
image files with a source or an exported ONNX folder.
"""
