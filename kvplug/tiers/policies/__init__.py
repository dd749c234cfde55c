"""kvplug.tiers.policies"""
