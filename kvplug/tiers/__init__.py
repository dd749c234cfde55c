"""kvplug.tiers"""
