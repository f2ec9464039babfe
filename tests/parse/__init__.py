"""Tests for mailhub.parse (Message-IDs, hostile headers)."""
