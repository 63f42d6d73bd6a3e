"""The report of a run: what a researcher reads after evaluate or predict.

The evaluate and predict stages hand over one ``ImageResult`` per image and call
``write_report``, which writes metrics.json (``metrics``), predictions.csv, PNG figures
(``figures``) and a self-contained index.html (``html``) into one folder.
"""

from breastnet.report.result import ImageResult
from breastnet.report.writer import Report, write_report

__all__ = ["ImageResult", "Report", "write_report"]
