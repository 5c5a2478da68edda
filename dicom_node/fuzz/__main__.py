"""``python -m dicom_node.fuzz``."""

import sys

from dicom_node.fuzz.cli import main

sys.exit(main())
