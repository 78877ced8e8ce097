"""The ``metering`` filter: tokens and cost of every attempt and exchange."""
